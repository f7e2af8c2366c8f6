"""Attention over packed sequences: several sequences one after another in one ``(T, heads, dim)`` tensor,
attention kept inside each. One implementation for the encoder (images, bidirectional) and the LM (samples,
causal), where transformers calls it by name (``model.lm.attn_implementation: vlmtrain_varlen``).

On a GPU in half precision it is torch's varlen flash attention (``cu_seqlens``, as NaViT, Qwen2-VL and
flash-attn's varlen do); elsewhere dense SDPA over the sequences of each length, so a packed row costs the
sum of its sequences' squared lengths, not the square of the row's length (the block-diagonal mask that
transformers' ``sdpa`` builds from restarting position ids is computed in full on a CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

VARLEN = "vlmtrain_varlen"


class Segments:
    """The sequences of a packed tensor, given by their lengths (host integers) or their cumulative offsets
    ``cu_seqlens`` (``(n + 1,)`` int32, on the tensor's device) and the longest."""

    def __init__(self, cu_seqlens: torch.Tensor, longest: int, lengths: list[int] | None = None) -> None:
        self.cu_seqlens = cu_seqlens
        self.longest = longest
        self._lengths = lengths
        self._groups: list[tuple[int, torch.Tensor]] | None = None

    @classmethod
    def of_lengths(cls, lengths: list[int], device: torch.device) -> Segments:
        cu = F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        return cls(cu.to(device), max(lengths, default=0), lengths)

    @property
    def lengths(self) -> list[int]:
        if self._lengths is None:  # one device-to-host copy, once
            self._lengths = self.cu_seqlens.diff().tolist()
        return self._lengths

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(length, the rows of all sequences of that length, sequence after sequence), built once."""
        if self._groups is None:
            rows: dict[int, list[torch.Tensor]] = {}
            start = 0
            for length in self.lengths:
                rows.setdefault(length, []).append(torch.arange(start, start + length))
                start += length
            device = self.cu_seqlens.device
            self._groups = [(length, torch.cat(parts).to(device)) for length, parts in rows.items() if length]
        return self._groups

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        scale: float | None = None,
        dropout: float = 0.0,
        window: int | None = None,
    ) -> torch.Tensor:
        """``(T, heads, dim)`` queries, ``(T, kv_heads, dim)`` keys and values → ``(T, heads, dim)``; with a
        sliding ``window`` (causal only), each token attends to itself and the ``window - 1`` before it, as
        transformers' sliding-window layers do."""
        if window is not None and not causal:
            raise ValueError("a sliding window needs causal attention")
        gqa = q.shape[1] != k.shape[1]
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not dropout and varlen_available():
            from torch.nn.attention.varlen import varlen_attn

            sides = (-1 if window is None else window - 1, 0) if causal else (-1, -1)
            cu = self.cu_seqlens
            return varlen_attn(q, k, v, cu, cu, self.longest, self.longest, scale=scale, window_size=sides, enable_gqa=gqa)
        out = torch.empty_like(q)
        for length, rows in self.groups():
            dense = [x[rows].view(-1, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v)]
            band = None if window is None or window >= length else sliding_window_band(length, window, q.device)
            attended = F.scaled_dot_product_attention(
                *dense, attn_mask=band, dropout_p=dropout, is_causal=causal and band is None, scale=scale, enable_gqa=gqa
            )  # no mask unless a window is shorter than the sequences: SDPA may pick its flash kernel
            out = out.index_copy(0, rows, attended.transpose(1, 2).reshape(-1, *q.shape[1:]))
        return out


def sliding_window_band(length: int, window: int, device: torch.device) -> torch.Tensor:
    """``(length, length)`` boolean mask: query ``i`` sees keys ``i - window + 1`` to ``i``."""
    offsets = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (offsets >= 0) & (offsets < window)


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401 (torch 2.9 and later)
    except ImportError:
        return False
    return True


_last: tuple[torch.Tensor, Segments] | None = None


def lm_segments(cu_seqlens: torch.Tensor, longest: int) -> Segments:
    """The segments of ``cu_seqlens``, shared by all layers of one forward pass (the same tensor each call)."""
    global _last
    if _last is None or _last[0] is not cu_seqlens:
        _last = (cu_seqlens, Segments(cu_seqlens, longest))
    return _last[1]


@torch.compiler.disable  # it groups sequences by their lengths, values a compiled layer would recompile for: run eager
def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: rows without padding attend per sequence, the sequences given by
    ``cu_seq_lens_q`` over the flattened rows (as flash-attn's varlen takes them) or by restarting position
    ids; rows with a padding mask, and decoding with a cache, go to transformers' SDPA."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"attn_implementation {VARLEN} has no soft-capped attention (this LM uses it): "
            "use flash_attention_2 with packing, or data.batching.packing: false"
        )
    batch, heads, length, dim = query.shape
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:  # offsets from position ids that restart at every sequence (one sequence per row at least)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=query.device)
        if position_ids.dim() == 3:  # multimodal RoPE: (sections, batch, length)
            position_ids = position_ids[0]
        (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids.expand(batch, length))

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)

    segments = lm_segments(cu, int(longest))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    dropout = dropout if module.training else 0.0
    window = kwargs.get("sliding_window")
    out = segments.attend(flat(query), flat(key), flat(value), causal, scale=scaling, dropout=dropout, window=window)
    return out.view(batch, length, heads, dim), None


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """No mask for rows without padding (packed rows are kept apart by the offsets); SDPA's for padded ones."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN, varlen_mask)
