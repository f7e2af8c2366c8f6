"""The budget selector: from an image's visual tokens at the lowest level (which the model computes anyway)
and its question's text embedding, the predicted loss gap of each level relative to the best level."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vlmtrain.errors import UserError
from vlmtrain.modeling.inputs import ModelInput
from vlmtrain.modeling.tokenizers import IGNORE_INDEX
from vlmtrain.modeling.vlm import VisionLanguageModel
from vlmtrain.weights import read_weights

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def selector_features(visual: torch.Tensor, token_counts: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
    """``(images, 2 * width)``: each image's mean visual token (``visual``: the images' tokens one after the
    other, ``token_counts`` each) beside the mean embedding of its question's text (``question``: ``(width,)``)."""
    owner = torch.repeat_interleave(torch.arange(len(token_counts), device=visual.device), token_counts)
    sums = visual.new_zeros(len(token_counts), visual.shape[-1]).index_add_(0, owner, visual)
    means = sums / token_counts.clamp(min=1)[:, None].to(visual.dtype)
    return torch.cat([means, question.to(visual.dtype).expand_as(means)], dim=-1)


class BudgetSelector(nn.Module):
    """A two-layer MLP over normalised features; tiny next to the encoder."""

    def __init__(self, features: int, levels: list[int], hidden: int = 64) -> None:
        super().__init__()
        self.levels = list(levels)
        self.hidden = hidden
        self.net = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, len(levels)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted loss gap per level, ``(images, levels)``."""
        return self.net(features.to(self.net[1].weight.dtype))

    def choose(self, features: torch.Tensor, tolerance: float) -> list[int]:
        """Per image, the smallest level whose predicted gap is at most ``tolerance`` (else the best one)."""
        gaps = self(features)
        chosen = []
        for row in gaps.tolist():
            within = [level for level, gap in zip(self.levels, row, strict=True) if gap <= tolerance]
            chosen.append(within[0] if within else self.levels[min(range(len(row)), key=row.__getitem__)])
        return chosen

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        features = self.net[0].normalized_shape[0]
        config = {"features": features, "levels": self.levels, "hidden": self.hidden}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        save_file({name: tensor.contiguous() for name, tensor in self.state_dict().items()}, str(directory / WEIGHTS_FILE))


def load_selector(directory: Path, levels: list[int]) -> BudgetSelector:
    """The selector saved in ``directory``; refused with one line when it was trained for other levels."""
    config = json.loads((directory / CONFIG_FILE).read_text())
    if list(config["levels"]) != list(levels):
        raise UserError(f"{directory}: a selector for levels {config['levels']}, but the model serves {list(levels)}")
    selector = BudgetSelector(config["features"], config["levels"], config["hidden"])
    selector.load_state_dict(read_weights(directory / WEIGHTS_FILE))
    return selector.eval()


def question_embedding(embeddings: nn.Module, input_ids: torch.Tensor, placeholders: torch.Tensor) -> torch.Tensor:
    """``(width,)``: the mean input embedding of a question's text tokens (its ``placeholders`` left out)."""
    text = input_ids[~placeholders]
    return embeddings(text).float().mean(dim=0)


def batch_features(model: VisionLanguageModel, inputs: ModelInput) -> list[torch.Tensor]:
    """The selector's features of each sample of a batch (``(its images, 2 * width)``; its images should be
    at the lowest level): the question is the sample's text that carries no label (prompt, earlier turns)."""
    embeddings = model.lm.get_input_embeddings()
    images = inputs.images
    per_image = model.visual_parts(model.encode_images(images))[0].float().split(images.token_counts.tolist())
    owners, asked = inputs.sample_ids, inputs.labels == IGNORE_INDEX
    found = []
    for row in range(inputs.size):
        mine = torch.nonzero(images.sample_index == row).squeeze(1).tolist()
        ids = inputs.input_ids[(owners == row) & asked]
        question = question_embedding(embeddings, ids, model.placeholders(ids))
        visual = torch.cat([per_image[index] for index in mine]) if mine else per_image[0][:0]
        found.append(selector_features(visual, images.token_counts[mine], question))
    return found
