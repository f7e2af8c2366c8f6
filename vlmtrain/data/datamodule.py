"""The LightningDataModule: the training stream and one validation stream per budget, from the recipe."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from vlmtrain.budget import BudgetSchedule
from vlmtrain.config import DataConfig
from vlmtrain.data.builder import BatchBuilder
from vlmtrain.data.pipeline import EvalStream, TrainStream, expand_shards


def _unbatched(item):
    """The streams yield whole batches: the DataLoader must pass them through untouched."""
    return item


class ShardDataModule(L.LightningDataModule):
    """Training batches from ``data.train`` on the budget schedule; validation on ``data.val`` at each budget."""

    def __init__(self, data: DataConfig, builder: BatchBuilder, schedule: BudgetSchedule) -> None:
        super().__init__()
        self.data = data
        self.builder = builder
        self.schedule = schedule
        self.train_urls = expand_shards(data.train)
        self.val_urls = expand_shards(data.val) if data.val else []

    def train_dataloader(self) -> DataLoader:
        stream = TrainStream(
            self.train_urls,
            self.builder,
            self.schedule,
            batch_visual_tokens=self.data.batch_visual_tokens,
            max_batch_size=self.data.max_batch_size,
            shuffle_buffer=self.data.shuffle_buffer,
        )
        return DataLoader(stream, batch_size=None, collate_fn=_unbatched, num_workers=self.data.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                EvalStream(self.val_urls, self.builder, budget, self.data.val_samples, self.data.batch_visual_tokens, self.data.max_batch_size),
                batch_size=None,
                collate_fn=_unbatched,
            )
            for budget in (self.schedule.levels if self.val_urls else ())
        ]
