"""``vlmtrain fit``: recipe → run directory → model → data → Lightning Trainer."""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import OmegaConf

from vlmtrain.config import Recipe, RecipeError, recipe_to_yaml
from vlmtrain.data.builder import BatchBuilder, SampleFormat
from vlmtrain.data.datamodule import ShardDataModule
from vlmtrain.text import TextEncoder
from vlmtrain.train.callbacks import BudgetThroughput, DataProgress, RunSummary
from vlmtrain.train.module import VLMModule

RECIPE_FILE = "recipe.yaml"
CHECKPOINT_DIR = "checkpoints"


class _DropAdverts(logging.Filter):
    """Lightning advertises a cloud logger on every run; users of this framework do not need to see it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence Lightning's advert and a deprecation warning raised inside Lightning itself."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def resume_checkpoint(recipe: Recipe) -> Path | None:
    """The checkpoint to continue from: ``resume=auto`` takes the run directory's last one (none: start
    afresh), ``resume=PATH`` that file."""
    if recipe.resume is None:
        return None
    if recipe.resume == "auto":
        last = Path(recipe.run_dir) / CHECKPOINT_DIR / "last.ckpt"
        return last if last.is_file() else None
    path = Path(recipe.resume)
    if not path.is_file():
        raise RecipeError(f"resume: checkpoint {str(path)!r} not found")
    return path


def prepare_run_dir(recipe: Recipe) -> Path:
    """Create the run directory and write the resolved recipe into it; refuse to overwrite a run unless asked."""
    run_dir = Path(recipe.run_dir)
    checkpoints = run_dir / CHECKPOINT_DIR
    if recipe.resume is None and checkpoints.exists() and any(checkpoints.iterdir()):
        if not recipe.overwrite:
            raise RecipeError(f"run_dir {str(run_dir)!r} already holds checkpoints; pass resume=auto, overwrite=true or another run_dir=...")
        shutil.rmtree(checkpoints)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    return run_dir


def build_loggers(recipe: Recipe, run_dir: Path) -> list[Logger]:
    """``csv``: metrics.csv in the run directory; ``wandb``: W&B (offline unless the recipe says not) and
    metrics.csv; ``none``: no logger."""
    if recipe.logger == "none":
        return []
    loggers: list[Logger] = [CSVLogger(save_dir=run_dir, name="", version="metrics")]
    if recipe.logger == "wandb":
        loggers.append(
            WandbLogger(
                name=recipe.name,
                save_dir=str(run_dir),
                project=recipe.wandb.project,
                entity=recipe.wandb.entity,
                offline=recipe.wandb.offline,
                tags=list(recipe.wandb.tags),
                config=OmegaConf.to_container(OmegaConf.structured(recipe)),
            )
        )
    return loggers


def build_trainer(recipe: Recipe, run_dir: Path, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The Lightning Trainer the recipe describes, with checkpoints, throughput and summary callbacks."""
    trainer = recipe.trainer
    loggers = build_loggers(recipe, run_dir)
    callbacks: list[L.Callback] = [
        *extra_callbacks,
        ModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, every_n_train_steps=trainer.checkpoint_every, save_last=True, save_top_k=0),
        BudgetThroughput(),
        DataProgress(),
        RunSummary(run_dir),
    ]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return L.Trainer(
        default_root_dir=run_dir,
        max_steps=trainer.max_steps,
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
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
        callbacks=callbacks,
    )


def build_datamodule(recipe: Recipe, module: VLMModule) -> ShardDataModule:
    """The data side, sized by the model's geometry and tokenizer."""
    data = recipe.data
    text = TextEncoder(module.tokenizer, recipe.model.lm.image_token, data.max_text_length)
    sample_format = SampleFormat(prompt=data.prompt, target_field=data.target_field, prompt_field=data.prompt_field, group_field=data.group_field)
    builder = BatchBuilder(module.geometry, text, sample_format, data.max_image_pixels, data.fast_decode)
    return ShardDataModule(data, builder, module.schedule)


def fit(recipe: Recipe, callbacks: Sequence[L.Callback] = ()) -> Path:
    """Train the recipe (with any extra Lightning ``callbacks``); returns the run directory (checkpoints,
    metrics, resolved recipe, summary)."""
    quiet_lightning()
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    checkpoint = resume_checkpoint(recipe)
    run_dir = prepare_run_dir(recipe)
    module = VLMModule(recipe)
    datamodule = build_datamodule(recipe, module)
    trainer = build_trainer(recipe, run_dir, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
    module.tokenizer.save_pretrained(run_dir / "tokenizer")
    return run_dir
