"""Labels for free: the model's own loss on each sample at every level it serves, with the selector's
features (each image's visual tokens at the lowest level, its question's text), in one pass per level."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file

from vlmtrain.data.pipeline import EvalStream
from vlmtrain.errors import UserError
from vlmtrain.export.format import TextFormat
from vlmtrain.modeling.geometry import Geometry
from vlmtrain.modeling.inputs import ModelInput
from vlmtrain.modeling.vlm import SampleLosses
from vlmtrain.text.encoding import TextEncoder
from vlmtrain.weights import read_weights


class LabelledModel(Protocol):
    """What labelling asks of a model (a loaded model, :class:`vlmtrain.inference.ExportedModel`)."""

    geometry: Geometry
    text: TextEncoder
    text_format: TextFormat

    def sample_losses(self, inputs: ModelInput) -> SampleLosses: ...

    def selector_features(self, inputs: ModelInput) -> list[torch.Tensor]: ...


@dataclass
class BudgetLabels:
    """One row per image: its sample's key, the selector's features, and the sample's mean target-token loss
    at each level (a multi-image sample's loss, all its images at that level, labels each of its images)."""

    keys: list[str]
    features: torch.Tensor  # (images, 2 * width)
    losses: torch.Tensor  # (images, levels)
    levels: list[int]
    seconds: float

    def gaps(self) -> torch.Tensor:
        """Each level's loss above the best level's, per image: what the selector learns to predict."""
        return self.losses - self.losses.min(dim=1, keepdim=True).values

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"features": self.features.contiguous(), "losses": self.losses.contiguous()}
        save_file(tensors, str(directory / "labels.safetensors"))
        summary = {"levels": self.levels, "keys": self.keys, "seconds": self.seconds}
        (directory / "labels.json").write_text(json.dumps(summary))

    @classmethod
    def read(cls, directory: Path) -> BudgetLabels:
        if not (directory / "labels.json").is_file():
            raise UserError(f"{directory}: no labels.json (write it with vlmtrain label-budgets)")
        summary = json.loads((directory / "labels.json").read_text())
        tensors = read_weights(directory / "labels.safetensors")
        return cls(summary["keys"], tensors["features"], tensors["losses"], summary["levels"], summary["seconds"])


@torch.no_grad()
def label_budgets(
    model: LabelledModel,
    urls: list[str],
    limit: int,
    where: dict[str, str] | None = None,
    text: TextFormat | None = None,
    batch_tokens: int = 8192,
) -> BudgetLabels:
    """The loss of the first ``limit`` samples of ``urls`` at each of the model's levels, and their features."""
    levels = list(model.geometry.levels)
    fields = (text or model.text_format).text_config(max_length=sys.maxsize)
    builder = model.batch_builder(fields)
    began = time.perf_counter()
    losses: dict[str, dict[int, float]] = {}
    features: dict[str, torch.Tensor] = {}
    for level in levels:
        stream = EvalStream(urls, builder, level, limit, batch_tokens, max_batch_size=64, where=where)
        for pairs, batch in stream.batches():
            inputs = batch.inputs
            per_sample = model.sample_losses(inputs)
            mean = per_sample.loss_sum / per_sample.tokens.clamp(min=1)
            for row, (sample, _) in enumerate(pairs):
                losses.setdefault(sample.key, {})[level] = float(mean[row])
            if level == levels[0]:  # the selector's inputs, as generate(budget="auto") computes them
                for (sample, _), found in zip(pairs, model.selector_features(inputs), strict=True):
                    if len(found):
                        features[sample.key] = found
    keys = [key for key in features if len(losses.get(key, {})) == len(levels)]
    if not keys:
        raise UserError(f"no usable sample with images in {urls[:1]}... for this model's prompt and target field")
    rows = [(key, image) for key in keys for image in features[key]]
    return BudgetLabels(
        keys=[key for key, _ in rows],
        features=torch.stack([image for _, image in rows]),
        losses=torch.tensor([[losses[key][level] for level in levels] for key, _ in rows]),
        levels=levels,
        seconds=time.perf_counter() - began,
    )
