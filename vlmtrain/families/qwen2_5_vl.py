"""The Qwen2.5-VL family: models with Qwen2.5-VL's vision tower (its patch merger included), and whole
Qwen2.5-VL checkpoints, whose language model (``model.language_model.*`` and ``lm_head``) is read as
:class:`~vlmtrain.modeling.qwen_lm.Qwen25VLTextForCausalLM` with its multimodal RoPE positions. Its geometry is
the tower kind's (``smart_resize``, :mod:`vlmtrain.modeling.backbones`). No native export yet: such a model
exports as one transformers model with vlmtrain's remote code."""

from __future__ import annotations

from vlmtrain.families.assembled import Family
from vlmtrain.model.description import ModelDescription


class Qwen25VLFamily(Family):
    """Every model with Qwen2.5-VL's vision tower, built as assembled models are; its LM may be a whole Qwen2.5-VL
    checkpoint's."""

    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    checkpoint_lms = {"qwen2_5_vl": {r"^model\.language_model\.": "model."}}

    def concerns(self, description: ModelDescription) -> bool:
        return description.vision.kind == "qwen2_5_vl"


QWEN2_5_VL = Qwen25VLFamily()
