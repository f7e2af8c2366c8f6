"""The LightningModule: which parts train and at what learning rate, the loss per budget, validation per budget."""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from vlmtrain.budget import BudgetSchedule
from vlmtrain.config import OptimConfig, Recipe
from vlmtrain.data.batch import Batch
from vlmtrain.geometry import Geometry
from vlmtrain.model.build import build_model, part_settings, plan_geometry, set_trainable
from vlmtrain.model.lm import lm_tokenizer
from vlmtrain.model.vlm import VisionLanguageModel
from vlmtrain.seeding import mix


def budget_schedule(recipe: Recipe) -> BudgetSchedule:
    """The recipe's budget schedule (uniform weights unless given)."""
    levels = tuple(recipe.budget.levels)
    weights = tuple(recipe.budget.weights) if recipe.budget.weights is not None else (1.0,) * len(levels)
    return BudgetSchedule(levels=levels, weights=weights, seed=recipe.seed, mode=recipe.budget.mode)


def as_batches(batch: Batch | list[Batch]) -> list[Batch]:
    """A step's batches: one, or one per budget in matryoshka mode."""
    return batch if isinstance(batch, list) else [batch]


def numel(parameter: torch.nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 keeps only a shard of it on this rank."""
    return getattr(parameter, "ds_numel", parameter.numel())


def trainable_report(model: VisionLanguageModel, optim: OptimConfig) -> str:
    """A table of parameters per part: total, trainable, learning rate."""
    rows = [f"{'part':<10} {'parameters':>12} {'trainable':>12} {'lr':>9}"]
    for name, part in model.parts().items():
        total = sum(numel(p) for p in part.parameters())
        trainable = sum(numel(p) for p in part.parameters() if p.requires_grad)
        lr = f"{part_settings(optim)[name].lr:.1e}" if trainable else ("frozen" if total else "-")
        rows.append(f"{name:<10} {total:>12,} {trainable:>12,} {lr:>9}")
    return "\n".join(rows)


def ranks_agree(values: list[int], device: torch.device) -> None:
    """Raise on every rank unless all ranks of the process group passed the same ``values``."""
    mine = torch.tensor(values, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, mine)
    if not all(torch.equal(other, mine) for other in everyone):
        raise RuntimeError(f"ranks disagree on (step, budgets): {[other.tolist() for other in everyone]}")


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of each group's learning rate at ``step``: linear warm-up, then cosine decay or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class VLMModule(L.LightningModule):
    """Trains a :class:`VisionLanguageModel` on batches whose budget follows the recipe's schedule.

    The model itself is built in :meth:`configure_model`, which Lightning calls inside the strategy's
    context: under DeepSpeed ZeRO-3 every weight is created (and loaded) already partitioned, so no rank
    ever holds the whole LM. The tokenizer and the geometry are known before, for the data pipeline.
    """

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.schedule = budget_schedule(recipe)
        self.tokenizer = lm_tokenizer(recipe.model.lm)
        self.geometry: Geometry = plan_geometry(recipe.model, tuple(recipe.budget.levels))
        self.model: VisionLanguageModel | None = None
        # checkpoints hold only what trains; frozen weights come back from the recipe on resume
        self.strict_loading = False

    def configure_model(self) -> None:
        """Build the model (once), seeded from the recipe: every rank and every launch builds the same one."""
        if self.model is not None:
            return
        self.model = build_model(self.recipe.model, tuple(self.recipe.budget.levels), self.tokenizer, self.recipe.seed)
        set_trainable(self.model, self.recipe.optim)
        # from_pretrained leaves models in eval mode: what trains must train (dropout on); frozen parts stay in eval
        self.model.train()
        for part in self.model.parts().values():
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()

    def on_fit_start(self) -> None:
        rank_zero_info("trainable parameters:\n" + trainable_report(self.model, self.recipe.optim))

    def check_schedule(self, batches: list[Batch]) -> None:
        """Every batch must carry the budgets the schedule gives its step (catches a desynchronised loader)."""
        expected = self.schedule.budgets(batches[0].step)
        found = tuple(b.budget for b in batches)
        if found != expected:
            raise RuntimeError(f"batch at step {batches[0].step} has budgets {found}, the schedule says {expected}")

    def check_ranks_agree(self, batches: list[Batch]) -> None:
        """All ranks must be at the same step with the same budgets, or sharded training (ZeRO-3) hangs."""
        if self.trainer.world_size > 1:
            ranks_agree([batches[0].step, *(b.budget for b in batches)], self.device)

    def on_train_batch_start(self, batch: Batch | list[Batch], batch_idx: int) -> None:
        # randomness inside the step (dropout) depends only on (seed, rank, step): a resumed run repeats it
        step = as_batches(batch)[0].step
        torch.manual_seed(mix(self.recipe.seed, self.global_rank, step) >> 1)

    def training_step(self, batch: Batch | list[Batch], batch_idx: int) -> torch.Tensor:
        batches = as_batches(batch)
        self.check_schedule(batches)
        self.check_ranks_agree(batches)
        losses = []
        for b in batches:
            loss = self.model.sample_losses(b).mean()
            self.log(f"train/loss@{b.budget}", loss, on_step=True, on_epoch=False, batch_size=b.size)
            losses.append(loss)
        loss = torch.stack(losses).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batches[0].size)
        if len(batches) == 1:
            self.log("budget", float(batches[0].budget), on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        losses = self.model.sample_losses(batch)
        self.log_token_mean(f"val/loss@{batch.budget}", losses.loss_sum, losses.tokens)
        for group in sorted(set(batch.groups) - {""}):
            selected = torch.tensor([g == group for g in batch.groups], device=losses.tokens.device)
            self.log_token_mean(f"val/loss@{batch.budget}/{group}", losses.loss_sum[selected], losses.tokens[selected])

    def log_token_mean(self, name: str, loss_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        """Log a loss averaged over target tokens across the whole validation pass."""
        count = int(tokens.sum())
        self.log(name, loss_sum.sum() / max(count, 1), on_epoch=True, batch_size=max(count, 1), add_dataloader_idx=False, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave frozen weights out of the checkpoint (a frozen 30B LM need not be saved every time)."""
        if "state_dict" in checkpoint:
            named = self.model.named_parameters(remove_duplicate=False)  # tied weights appear under every name
            frozen = {f"model.{name}" for name, p in named if not p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def parameter_groups(self) -> Iterator[dict]:
        """One AdamW group per trainable part, and one without weight decay for its biases and norms."""
        for name, part in self.model.parts().items():
            settings = part_settings(self.recipe.optim)[name]
            params = [p for p in part.parameters() if p.requires_grad]
            if not settings.trainable or not params:
                continue
            matrices = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]  # ZeRO-3 shards are flat
            vectors = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
            for group, suffix, decay in ((matrices, "", self.recipe.optim.weight_decay), (vectors, "/no_decay", 0.0)):
                if group:
                    yield {"params": group, "lr": settings.lr, "weight_decay": decay, "name": name + suffix}

    def configure_optimizers(self) -> dict:
        optim = self.recipe.optim
        optimizer = torch.optim.AdamW(list(self.parameter_groups()), betas=tuple(optim.betas))
        total = self.recipe.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, optim.warmup_steps, total, optim.schedule, optim.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
