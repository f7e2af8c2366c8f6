"""What trains and how fast: each part frozen or trained as the recipe's ``optim`` section says (an LM with
LoRA adapters trains only them), AdamW's parameter groups, one per trained part, and the learning-rate
schedule (transformers' own: linear warm-up from 0, then cosine down to ``min_lr_ratio`` or constant)."""

from __future__ import annotations

from collections.abc import Iterator

from peft import PeftModel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from vlmtrain.config import OptimConfig, PartConfig
from vlmtrain.model.lm import is_adapter_parameter
from vlmtrain.modeling.vlm import VisionLanguageModel


def part_settings(optim: OptimConfig) -> dict[str, PartConfig]:
    """The recipe's settings of each part, by the names of :meth:`VisionLanguageModel.parts`."""
    return {"vision": optim.vision, "pooling": optim.pooling, "projector": optim.projector, "lm": optim.lm}


def set_trainable(model: VisionLanguageModel, optim: OptimConfig) -> None:
    """Freeze or unfreeze each part as the recipe says; a part with LoRA adapters (the LM, the vision encoder, the
    projector) trains only the adapters."""
    settings = part_settings(optim)
    for name, part in model.parts().items():
        adapted = isinstance(part, PeftModel)
        for parameter_name, parameter in part.named_parameters():  # one by one: a 4-bit base weight cannot train
            parameter.requires_grad_(settings[name].trainable and (not adapted or is_adapter_parameter(parameter_name)))


def parameter_groups(model: VisionLanguageModel, optim: OptimConfig) -> Iterator[dict]:
    """One AdamW group per trainable part, and one without weight decay for its biases and norms."""
    for name, part in model.parts().items():
        settings = part_settings(optim)[name]
        params = [p for p in part.parameters() if p.requires_grad]
        if not settings.trainable or not params:
            continue
        matrices = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]  # ZeRO-3 shards are flat
        vectors = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
        for group, suffix, decay in ((matrices, "", optim.weight_decay), (vectors, "/no_decay", 0.0)):
            if group:
                yield {"params": group, "lr": settings.lr, "weight_decay": decay, "name": name + suffix}


def learning_rate_schedule(optimizer: Optimizer, optim: OptimConfig, total_steps: int) -> LambdaLR:
    """The recipe's schedule of every group's learning rate over ``total_steps``, stepped once per step."""
    if optim.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, optim.warmup_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, optim.warmup_steps, total_steps, min_lr_rate=optim.min_lr_ratio)
