"""The next-token loss without the full logits: the LM head and the cross-entropy run over the labelled tokens a
chunk at a time, each chunk's logits recomputed in the backward pass (activation checkpointing), so at most one
chunk's logits exist at any moment (a 4,096-token answer at a 262,144-token vocabulary is 4.3 GB of fp32
logits held whole). The numbers are the plain path's: the head, its soft-capping and fp32 cross-entropy, in the
same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import UserError

# LM types whose logits are lm_head(hidden), soft-capped by config.final_logit_softcapping when set: what the
# chunked loss reproduces. Others (Cohere's logit_scale, Granite's logits_scaling, ...) are refused.
PLAIN_HEADS = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "gemma4_text", "smollm3", "phi3",
    "olmo2", "ministral", "qwen2_5_vl_text", "qwen3_vl_text",
})


def check_plain_head(model_type: str) -> None:
    """Refuse, in one line, an LM whose logits the chunked loss cannot reproduce."""
    if model_type not in PLAIN_HEADS:
        raise UserError(
            f"model.lm.loss_chunk_tokens: the chunked loss knows how {', '.join(sorted(PLAIN_HEADS))} LMs compute their "
            f"logits, not {model_type!r}; set it to 0"
        )


def _chunk(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, softcap: float | None) -> tuple[torch.Tensor, ...]:
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(dim=-1)


def chunked_token_losses(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, softcap: float | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 loss, predicted token) of each of the ``(N, hidden)`` states against its label, ``chunk`` tokens at a
    time through ``head``."""
    losses, predictions = [], []
    for start in range(0, hidden.shape[0], chunk):
        pieces = (hidden[start : start + chunk], labels[start : start + chunk], head, softcap)
        loss, predicted = checkpoint(_chunk, *pieces, use_reentrant=False) if torch.is_grad_enabled() else _chunk(*pieces)
        losses.append(loss)
        predictions.append(predicted)
    if not losses:
        return hidden.new_zeros(0, dtype=torch.float32), labels.new_zeros(0)
    return torch.cat(losses), torch.cat(predictions)
