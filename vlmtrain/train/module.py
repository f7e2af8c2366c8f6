"""The LightningModule: which parts train and at what learning rate, the loss per budget, validation per budget."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from vlmtrain.config import OptimConfig
from vlmtrain.data.batch import Batch, Step
from vlmtrain.families import build_model
from vlmtrain.modeling.vlm import SampleLosses, VisionLanguageModel
from vlmtrain.plan import RunPlan
from vlmtrain.seeding import mix
from vlmtrain.train.compile import compile_layers
from vlmtrain.train.fsdp import shard
from vlmtrain.train.optim import learning_rate_schedule, parameter_groups, part_settings, set_trainable


@dataclass
class BudgetValidation:
    """One budget's validation loss per target token, over all samples and per validation group."""

    loss: float
    groups: dict[str, float] = field(default_factory=dict)


class ValidationTotals:
    """Summed loss and target tokens per (budget, group) over one validation pass ('' is every sample)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)

    def add(self, batch: Batch, loss_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        self.sums[(batch.budget, "")].append(torch.stack([loss_sum.sum(), tokens.sum().to(loss_sum.dtype)]))
        for group in sorted(set(batch.groups) - {""}):
            selected = torch.tensor([g == group for g in batch.groups], device=tokens.device)
            self.sums[(batch.budget, group)].append(
                torch.stack([loss_sum[selected].sum(), tokens[selected].sum().to(loss_sum.dtype)])
            )

    def results(self) -> dict[int, BudgetValidation]:
        """Loss per target token by budget and group, summed over every rank (a collective under DDP/ZeRO)."""
        mine = {key: [float(value) for value in torch.stack(parts).sum(0)] for key, parts in self.sums.items()}
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        totals: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for rank in ranks:
            for key, (loss_sum, tokens) in rank.items():
                totals[key][0] += loss_sum
                totals[key][1] += tokens
        results: dict[int, BudgetValidation] = {}
        for (budget, group), (loss_sum, tokens) in sorted(totals.items()):
            mean = loss_sum / max(tokens, 1.0)
            if group:
                results[budget].groups[group] = mean
            else:
                results[budget] = BudgetValidation(mean)
        return results


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


def losses_by_budget(batch: Batch, losses: SampleLosses) -> dict[int, torch.Tensor]:
    """The batch's loss per target token, per image budget. A sample counts towards each budget its images
    are at, in proportion (a sample with one image at 1120 and one at 70 counts half to each); a sample
    without images counts towards the batch's budget (none when each image has its own). With one budget
    for the whole batch this is the batch's mean loss."""
    images = batch.inputs.images
    samples = losses.tokens.shape[0]
    per_sample = torch.bincount(images.sample_index, minlength=samples).to(losses.loss_sum.dtype)
    budgets = torch.tensor(batch.image_budgets, device=images.sample_index.device, dtype=torch.long)
    results = {}
    for budget in sorted(set(batch.image_budgets) | ({batch.budget} - {None})):
        at_budget = torch.bincount(images.sample_index[budgets == budget], minlength=samples).to(losses.loss_sum.dtype)
        weight = torch.where(per_sample > 0, at_budget / per_sample.clamp(min=1), float(budget == batch.budget))
        results[budget] = (weight * losses.loss_sum).sum() / (weight * losses.tokens).sum().clamp(min=1)
    return results


def log_this_step(module: L.LightningModule, values: dict[str, float | torch.Tensor], every: int | None = None) -> None:
    """Log metrics that only some steps have (a budget's loss and speed) to the loggers, at this step only.

    ``self.log`` would report their last value again at every later step (Lightning keeps what was once
    logged), so a chart of the loss at 70 tokens would show steps trained at 1120. Logged every ``every``
    steps (default: ``trainer.log_every``), at the step number Lightning's own rows carry."""
    trainer = module.trainer
    step = trainer.fit_loop.epoch_loop._batches_that_stepped  # what Lightning logs its own rows at
    if not trainer.loggers or (step + 1) % (every or trainer.log_every_n_steps):
        return
    scalars = {name: float(value) for name, value in values.items()}
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)


class VLMModule(L.LightningModule):
    """Trains a :class:`VisionLanguageModel` on the steps of the run plan's budget schedule.

    The model itself is built in :meth:`configure_model`, which Lightning calls inside the strategy's
    context: under DeepSpeed ZeRO-3 every weight is created (and loaded) already partitioned, so no rank
    ever holds the whole LM; under FSDP2 it is built whole and then sharded. The plan (tokenizer, geometry,
    schedule) is known before, for the data side.
    """

    def __init__(self, plan: RunPlan) -> None:
        super().__init__()
        self.plan = plan
        self.recipe = plan.recipe
        self.model: VisionLanguageModel | None = None
        self.validation = ValidationTotals()
        self.last_validation: dict[int, BudgetValidation] = {}
        # checkpoints hold only what trains; frozen weights come back from the recipe on resume
        self.strict_loading = False

    def configure_model(self) -> None:
        """Build the model (once), seeded from the recipe: every rank and every launch builds the same one;
        its LM layers compiled if the recipe asks; under FSDP2 it is then sharded over the ranks (the strategy
        gives the device mesh)."""
        if self.model is not None:
            return
        self.model = build_model(self.plan.model, self.plan.start, self.plan.tokenizer, self.recipe.seed)
        set_trainable(self.model, self.recipe.optim)
        if self.recipe.trainer.compile:
            compile_layers(self.model)
        if self.device_mesh is not None:
            shard(self.model, self.device_mesh["data_parallel"])
        # from_pretrained leaves models in eval mode: what trains must train (dropout on); frozen parts stay in eval
        self.model.train()
        for part in self.model.parts().values():
            if not any(p.requires_grad for p in part.parameters()):
                part.eval()

    def on_fit_start(self) -> None:
        rank_zero_info("trainable parameters:\n" + trainable_report(self.model, self.recipe.optim))

    def check_schedule(self, step: Step) -> None:
        """Every step must carry the budgets the schedule gives it (catches a desynchronised loader)."""
        expected = self.plan.schedule.budgets(step.index)
        if step.budgets != expected:
            raise RuntimeError(f"batch at step {step.index} has budgets {step.budgets}, the schedule says {expected}")

    def check_ranks_agree(self, step: Step) -> None:
        """All ranks must be at the same step with the same batch budgets (0: budgets per image), or sharded
        training (ZeRO-3) hangs; every rank runs every module at every step whatever its images' budgets."""
        if self.trainer.world_size > 1:
            ranks_agree([step.index, *(budget or 0 for budget in step.budgets)], self.device)

    def on_train_batch_start(self, step: Step, batch_idx: int) -> None:
        # randomness inside the step (dropout) depends only on (seed, rank, step): a resumed run repeats it
        torch.manual_seed(mix(self.recipe.seed, self.global_rank, step.index) >> 1)

    def training_step(self, step: Step, batch_idx: int) -> dict:
        """The mean loss over the step's budgets; the loss of each budget is returned beside it, as data."""
        self.check_schedule(step)
        self.check_ranks_agree(step)
        losses = [(batch, self.model.sample_losses(batch.inputs)) for batch in step.batches]
        loss = torch.stack([sample_losses.mean() for _, sample_losses in losses]).mean()
        budget_losses = {
            budget: value.detach()
            for batch, sample_losses in losses
            for budget, value in losses_by_budget(batch, sample_losses).items()
        }
        log_this_step(self, {f"train/loss@{budget}": value for budget, value in budget_losses.items()})
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=step.batches[0].size)
        if len(step.batches) == 1:  # the batch's budget, or the mean budget of its images when each has its own
            batch = step.batches[0]
            budget = batch.budget if batch.budget is not None else sum(batch.image_budgets) / max(len(batch.image_budgets), 1)
            self.log("budget", float(budget), on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        return {"loss": loss, "budget_losses": budget_losses}

    def on_validation_epoch_start(self) -> None:
        self.validation = ValidationTotals()

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        losses = self.model.sample_losses(batch.inputs)
        self.validation.add(batch, losses.loss_sum, losses.tokens)

    def on_validation_epoch_end(self) -> None:
        """Loss per target token of the whole pass, per budget and group, logged and kept in ``last_validation``."""
        self.last_validation = self.validation.results()
        for budget, result in self.last_validation.items():
            self.log(f"val/loss@{budget}", result.loss, on_epoch=True, batch_size=1)
            for group, loss in result.groups.items():
                self.log(f"val/loss@{budget}/{group}", loss, on_epoch=True, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave frozen weights out of the checkpoint (a frozen 30B LM need not be saved every time)."""
        if "state_dict" in checkpoint:
            named = self.model.named_parameters(remove_duplicate=False)  # tied weights appear under every name
            frozen = {f"model.{name}" for name, p in named if not p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def configure_optimizers(self) -> dict:
        optim = self.recipe.optim
        optimizer = torch.optim.AdamW(list(parameter_groups(self.model, optim)), betas=tuple(optim.betas))
        scheduler = learning_rate_schedule(optimizer, optim, self.recipe.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
