"""Qwen2.5-VL's and Qwen3-VL's language models as causal LMs of their own (transformers has their text models, not
a causal LM around them), registered with ``AutoModelForCausalLM`` for their text configs, and their multimodal
RoPE positions (the same rule for images in both).

Qwen's LM gives every token three positions (time, row, column): a text token has its index three times; the
tokens of an image continue from the text before it, ``(p, p + row, p + column)``, and the text after it from
``p + max(rows, columns)``. :meth:`QwenVLTextForCausalLM.rope_positions` computes them for padded and for
packed rows (each sample's positions restarting at 0), as ``Qwen2_5_VLModel.get_rope_index`` (and Qwen3-VL's)
does per sample. Qwen3-VL's text model also takes DeepStack features: visual features added to the hidden states of
its first layers at the image tokens (``visual_pos_masks``, ``deepstack_visual_embeds``), with the prompt only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Cache,
    GenerationMixin,
    PretrainedConfig,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    Qwen3VLTextConfig,
    Qwen3VLTextModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLPreTrainedModel

from .prompt import OPENS


class QwenVLTextForCausalLM:
    """A Qwen-VL text model and LM head (the weights ``model.language_model.*`` and ``lm_head.*`` of a whole
    checkpoint, read with a key mapping); a family's class (this first, then the family's pretrained model
    class and ``GenerationMixin``) names its transformers text model."""

    text_model_class: type[nn.Module]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.model = self.text_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_deltas: torch.Tensor | None = None  # generation: each row's 3-D position past its 1-D one
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_decoder(self) -> nn.Module:
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        visual_pos_masks: torch.Tensor | None = None,
        deepstack_visual_embeds: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The LM's logits (at ``logits_to_keep``). A prompt given 3-D positions (:meth:`rope_positions`) sets how
        far its text positions run ahead of the token count; the tokens generated after it (1-D positions and a
        cache) continue from there, as Qwen's own generation does. DeepStack features (Qwen3-VL) go with the
        prompt."""
        decoding = cache is not None and cache.get_seq_length() > 0
        if position_ids is not None and position_ids.ndim == 3:
            self.rope_deltas = position_ids.amax(dim=(0, 2)) + 1 - position_ids.shape[-1]
        elif decoding and self.rope_deltas is not None:
            if position_ids is None:
                length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
                position_ids = torch.arange(length, device=self.lm_head.weight.device)[None] + cache.get_seq_length()
            position_ids = (position_ids + self.rope_deltas[:, None]).expand(3, -1, -1)
        elif not decoding:
            self.rope_deltas = None
        if deepstack_visual_embeds and not decoding:  # (generation passes them on at every step: the prompt's only)
            kwargs.update(visual_pos_masks=visual_pos_masks, deepstack_visual_embeds=deepstack_visual_embeds)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return CausalLMOutputWithPast(logits=self.lm_head(outputs.last_hidden_state[:, kept]), cache=outputs.cache)

    @staticmethod
    def rope_positions(
        input_ids: torch.Tensor, positions: torch.Tensor, sample_ids: torch.Tensor, placeholders: torch.Tensor,
        token_grids: torch.Tensor, token_times: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(3, R, L)`` positions of rows ``input_ids`` whose 1-D ``positions`` restart at each of their samples
        (``sample_ids``: each token's; -1 on padding), the images' ``placeholders`` (a mask) in order holding
        ``token_grids`` (rows, columns) tokens each: one block each (an image, a video's unit as Qwen3-VL places it),
        or, where ``token_times`` is not OPENS (-1), in the block the previous one opened at that time after its start (a
        joined video's units, as Qwen2.5-VL places them)."""
        time, row, column = (positions.clone() for _ in range(3))
        flat = torch.nonzero(placeholders.flatten()).squeeze(1)
        times = [OPENS] * len(token_grids) if token_times is None else token_times.tolist()
        length = input_ids.shape[1]
        start, base = 0, 0
        for (rows, columns), offset in zip(token_grids.tolist(), times, strict=True):
            places = flat[start : start + rows * columns]
            start += rows * columns
            line, first = divmod(int(places[0]), length)
            continues = offset != OPENS
            base, offset = (base, offset) if continues else (int(time[line, first]), 0)
            index = torch.arange(rows * columns, device=input_ids.device)
            cells = places % length
            time[line, cells], row[line, cells], column[line, cells] = (
                base + offset, base + index // columns, base + index % columns
            )
            later = torch.arange(length, device=input_ids.device) > int(cells[-1])
            after = later & (sample_ids[line] == sample_ids[line, first])
            # the text after an image (a block) goes on from base + max(rows, columns)
            shift = rows * columns - (0 if continues else max(rows, columns))
            for part in (time, row, column):
                part[line, after] -= shift
        return torch.stack([time, row, column])


class Qwen25VLTextForCausalLM(QwenVLTextForCausalLM, Qwen2_5_VLPreTrainedModel, GenerationMixin):
    """Qwen2.5-VL's language model."""

    config_class = Qwen2_5_VLTextConfig
    text_model_class = Qwen2_5_VLTextModel


class Qwen3VLTextForCausalLM(QwenVLTextForCausalLM, Qwen3VLPreTrainedModel, GenerationMixin):
    """Qwen3-VL's language model (its first layers also take DeepStack features)."""

    config_class = Qwen3VLTextConfig
    text_model_class = Qwen3VLTextModel


for lm_class in (Qwen25VLTextForCausalLM, Qwen3VLTextForCausalLM):
    AutoModelForCausalLM.register(lm_class.config_class, lm_class, exist_ok=True)
