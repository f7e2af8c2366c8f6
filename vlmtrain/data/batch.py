"""What the data pipeline hands to training: a step's batches (one per budget) and the data position after
it, and each batch's model input with the bookkeeping of its samples."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from vlmtrain.modeling.inputs import ModelInput
from vlmtrain.modeling.tokenizers import IGNORE_INDEX


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
        """Padding ÷ all positions of the text tensor (images are packed: the encoder pads nothing)."""
        return 1.0 - self.tokens / max(self.inputs.input_ids.numel(), 1)

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


def pack_text(
    sequences: list[list[int]], labels: list[list[int]], pad_id: int, row_tokens: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Samples one after another in rows of at most ``row_tokens`` tokens (one row when None), in order (a row
    is closed when the next sample does not fit); the last rows padded to the longest. Returns ids, position
    ids (restarting at 0 for every sample, and for the padding), sequence ids (each token's sample, -1 on
    padding), labels, and the offsets of the sequences (samples and padding) in the flattened rows,
    ``cu_seqlens`` as varlen attention takes them."""
    rows: list[list[int]] = [[]]
    used = 0
    for index, ids in enumerate(sequences):
        if row_tokens is not None and rows[-1] and used + len(ids) > row_tokens:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += len(ids)
    length = max(sum(len(sequences[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    label_tensor = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    sequence_ids = torch.full((len(rows), length), -1, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            ids, end = sequences[index], start + len(sequences[index])
            input_ids[row, start:end] = torch.tensor(ids, dtype=torch.long)
            label_tensor[row, start:end] = torch.tensor(labels[index], dtype=torch.long)
            sequence_ids[row, start:end] = index
            position_ids[row, start:end] = torch.arange(len(ids))
            start = end
        position_ids[row, start:] = torch.arange(length - start)  # the padding is a sequence of its own
    starts = torch.nonzero(position_ids.flatten() == 0).flatten()
    cu_seqlens = torch.cat([starts, torch.tensor([position_ids.numel()])]).to(torch.int32)
    return input_ids, position_ids, sequence_ids, label_tensor, cu_seqlens
