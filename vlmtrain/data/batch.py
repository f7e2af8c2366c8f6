"""What the data pipeline hands to training: a step's batches (one per budget) and the data position after
it, and each batch's model input with the bookkeeping of its samples."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from vlmtrain.model.inputs import ModelInput
from vlmtrain.text.tokenizers import IGNORE_INDEX


@dataclass
class Batch:
    """Samples encoded at one token budget (``None``: each image at its own, in ``image_budgets``): the model's
    input, each sample's key, validation group and data epoch, and the batch's token counts (known when the
    batch is made, so that throughput needs nothing back from the device)."""

    inputs: ModelInput
    budget: int | None
    keys: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    image_budgets: list[int] = field(default_factory=list)
    tokens: int = 0  # LM tokens of the samples (text and visual, no padding), counted on the host
    grids: list[tuple[int, int]] = field(default_factory=list)  # each image's token grid, on the host

    @property
    def visual_tokens(self) -> int:
        return sum(rows * cols for rows, cols in self.grids)

    @property
    def padding(self) -> float:
        """Padded visual-token slots ÷ all slots, when every image is padded to the batch's largest."""
        counts = [rows * cols for rows, cols in self.grids]
        return 1.0 - sum(counts) / (max(counts) * len(counts)) if counts else 0.0

    @property
    def size(self) -> int:
        return self.inputs.size

    def pin_memory(self) -> Batch:
        return replace(self, inputs=self.inputs.pin_memory())


@dataclass
class DataPosition:
    """Where the data stands after a step: the stream that made it and that stream's state (for resume,
    with its skip counts so far)."""

    stream: int = 0
    state: dict = field(default_factory=dict)


@dataclass
class Step:
    """One training step: its index in the budget schedule, its batches (one, or one per budget in
    matryoshka mode; the same samples in each) and the data position after it."""

    index: int
    batches: list[Batch]
    position: DataPosition = field(default_factory=DataPosition)

    @property
    def budgets(self) -> tuple[int | None, ...]:
        return tuple(batch.budget for batch in self.batches)

    def pin_memory(self) -> Step:
        return replace(self, batches=[batch.pin_memory() for batch in self.batches])


def pad_text(sequences: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad token ids (with ``pad_id``) and labels (with IGNORE_INDEX); returns ids, attention mask, labels."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    label_tensor = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(zip(sequences, labels, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        label_tensor[row, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
    return input_ids, attention_mask, label_tensor
