"""``vlmtrain fit``: recipe → run directory → model → data → Lightning Trainer."""

from __future__ import annotations

import logging
import pickle
import shutil
import signal
import uuid
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from vlmtrain.config import Recipe, RecipeError, recipe_values, run_recipe_yaml
from vlmtrain.data.builder import BatchBuilder
from vlmtrain.data.datamodule import ShardDataModule
from vlmtrain.dependencies import quiet_dependencies
from vlmtrain.errors import RunInterrupted, UserError
from vlmtrain.plan import RunPlan
from vlmtrain.text.encoding import TextEncoder
from vlmtrain.train.adapters import save_adapter
from vlmtrain.train.callbacks import BudgetThroughput, DataProgress, RunSummary
from vlmtrain.train.checkpoints import AtomicCheckpoint
from vlmtrain.train.interrupts import CSVMetrics, StopOnSignal, StoppedBetweenSteps, handlers_kept
from vlmtrain.train.layout import (
    ADAPTER,
    CHECKPOINTS,
    METRICS,
    RECIPE_FILE,
    RUN_OUTPUTS,
    TOKENIZER,
    WANDB_RUN_ID,
    latest_checkpoint,
)
from vlmtrain.train.module import VLMModule
from vlmtrain.train.preflight import prepare, resume_log
from vlmtrain.train.progress import ProgressLog, StepProgressBar, on_a_terminal
from vlmtrain.train.strategy import build_strategy, device_count, node_count

log = logging.getLogger(__name__)


def prepare_run_dir(recipe: Recipe) -> Path:
    """Create the run directory and write the resolved recipe into it (rank 0), its paths absolute; every rank
    refuses to overwrite a run unless asked. ``overwrite=true`` removes everything the earlier run wrote (its
    checkpoints, metrics, W&B run, summary, evaluation), and a run from step 0 is a new W&B run."""
    run_dir = Path(recipe.run_dir)
    checkpoints = run_dir / CHECKPOINTS
    if recipe.resume is None and checkpoints.exists() and any(checkpoints.iterdir()) and not recipe.overwrite:
        raise RecipeError(
            f"run_dir {str(run_dir)!r} already holds checkpoints; pass resume=auto, overwrite=true or another run_dir=..."
        )
    _write_run_dir(recipe, run_dir)
    return run_dir


@rank_zero_only
def _write_run_dir(recipe: Recipe, run_dir: Path) -> None:
    if recipe.overwrite:
        removed = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
        for name in removed:
            shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
        if removed:
            log.warning("overwrite=true: removed the earlier run's %s from %s", ", ".join(removed), run_dir)
    if recipe.resume is None:
        (run_dir / WANDB_RUN_ID).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECIPE_FILE).write_text(run_recipe_yaml(recipe, Path.cwd()))


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run directory, created on first use: a resumed run continues the same W&B run."""
    path = run_dir / WANDB_RUN_ID
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def build_loggers(recipe: Recipe, run_dir: Path) -> list[Logger]:
    """``csv``: ``metrics/version_N/metrics.csv`` in the run directory (one version per launch, so a resumed
    run keeps what came before); ``wandb``: W&B (offline unless the recipe says not) and the CSV; ``none``."""
    if recipe.logger == "none":
        return []
    # metrics.csv is written as the run goes: `tail -f` follows it
    loggers: list[Logger] = [CSVMetrics(save_dir=run_dir, name=METRICS, flush_logs_every_n_steps=recipe.trainer.log_every)]
    if recipe.logger == "wandb":
        wandb = WandbLogger(
            name=recipe.name,
            save_dir=str(run_dir),
            id=wandb_run_id(run_dir) if rank_zero_only.rank == 0 else None,
            resume="allow",
            project=recipe.wandb.project,
            entity=recipe.wandb.entity,
            offline=recipe.wandb.offline,
            tags=list(recipe.wandb.tags),
            config=recipe_values(recipe),
        )
        # Lightning passes anonymous=None, which W&B warns about on every run although it means nothing
        wandb._wandb_init.pop("anonymous", None)
        loggers.append(wandb)
    return loggers


def build_trainer(recipe: Recipe, run_dir: Path, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The Lightning Trainer the recipe describes, with checkpoints, throughput, progress, signal handling
    and summary callbacks (in the order they must see each step)."""
    trainer = recipe.trainer
    loggers = build_loggers(recipe, run_dir)
    throughput = BudgetThroughput(trainer.log_every)
    data = DataProgress()
    checkpoint = AtomicCheckpoint(run_dir / CHECKPOINTS, every=trainer.checkpoint_every, keep=trainer.keep_checkpoints)
    terminal = on_a_terminal()
    callbacks: list[L.Callback] = [
        *extra_callbacks,
        throughput,
        data,  # records the data position before anything saves a checkpoint
        StopOnSignal(checkpoint, trainer.stop_within),
        RunSummary(run_dir, throughput),
        StepProgressBar() if terminal else ProgressLog(trainer.log_every, throughput, data),
        checkpoint,
    ]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return L.Trainer(
        default_root_dir=run_dir,
        max_steps=trainer.max_steps,
        accelerator=trainer.accelerator,
        strategy=build_strategy(recipe),
        devices=device_count(recipe),
        num_nodes=node_count(recipe),
        precision=trainer.precision,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        gradient_clip_val=recipe.optim.grad_clip or None,
        val_check_interval=trainer.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=None if recipe.data.val else 0,
        log_every_n_steps=trainer.log_every,
        num_sanity_val_steps=0,
        deterministic=trainer.deterministic,
        use_distributed_sampler=False,
        logger=loggers or False,
        callbacks=callbacks,  # AtomicCheckpoint is the checkpoint callback: Lightning adds no other
        enable_progress_bar=terminal,
        enable_model_summary=False,  # the module prints its own table of parameters per part
    )


def batch_builder(plan: RunPlan) -> BatchBuilder:
    """How the plan's samples become batches: its geometry, tokenizer and the recipe's text and decoding."""
    data = plan.recipe.data
    text = TextEncoder(plan.tokenizer, plan.model.lm.image_token, plan.frames.token)
    return BatchBuilder(plan.geometry, text, data.text, data.decoding, data.video, plan.frames)


def build_datamodule(plan: RunPlan) -> ShardDataModule:
    """The data side of a run: the recipe's shards, batched by the plan's geometry, tokenizer and schedule."""
    return ShardDataModule(plan.recipe.data, batch_builder(plan), plan.schedule)


def fit(recipe: Recipe, callbacks: Sequence[L.Callback] = (), source: str = "recipe", prepared: tuple | None = None) -> Path:
    """Train the recipe (``source`` names it in error messages), with any extra Lightning ``callbacks``;
    returns the run directory (checkpoints, metrics, resolved recipe, summary). ``prepared``: what
    :func:`prepare` returned, when the caller checked the recipe before importing the training stack."""
    quiet_dependencies()
    plan, checkpoint = prepared or prepare(recipe, source)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    run_dir = prepare_run_dir(recipe)
    resume_log(checkpoint, run_dir, recipe.resume)
    module = VLMModule(plan)
    datamodule = build_datamodule(plan)
    trainer = build_trainer(recipe, run_dir, callbacks)
    stop = next(callback for callback in trainer.callbacks if isinstance(callback, StopOnSignal))
    try:
        with handlers_kept():
            trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)  # no pickled objects
    except StoppedBetweenSteps:
        cut_short = " (between steps: the wait for data or the validation round cut short)"
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met an object it would have to run
        raise UserError(
            f"resume: {checkpoint} holds Python objects that loading would run (refused: only tensors and plain values "
            "are read); it is not a checkpoint vlmtrain wrote"
        ) from None
    else:
        cut_short = ""
        save_adapter(module.model.lm, trainer, run_dir / ADAPTER)
    if trainer.is_global_zero:
        plan.tokenizer.save_pretrained(run_dir / TOKENIZER)
    if stop.stopped_at is not None:
        saved = latest_checkpoint(run_dir / CHECKPOINTS)
        raise RunInterrupted(
            f"{signal.Signals(stop.received).name} at step {stop.stopped_at}{cut_short}; "
            f"{f'checkpoint {saved}' if saved else 'no step trained yet, nothing saved'}; "
            f"continue with: vlmtrain fit {run_dir / RECIPE_FILE} resume=auto",
            stop.received,
        )
    return run_dir
