"""Where a run keeps its checkpoints: names shared by training (writes), resume and export (read).

Each checkpoint is a directory ``step-000000500/`` holding ``state`` (Lightning's checkpoint: a file, or
a directory of shards under DeepSpeed; what resume reads) and ``trained.safetensors`` (every trained
parameter, whole even under ZeRO-3: what export reads). ``latest`` names the newest complete one.
"""

from __future__ import annotations

from pathlib import Path

from vlmtrain.config import Recipe, RecipeError

RECIPE_FILE = "recipe.yaml"  # the resolved recipe, at the run directory's root
CHECKPOINTS = "checkpoints"
LATEST = "latest"
PARTIAL = ".partial"
STATE = "state"
TRAINED = "trained.safetensors"
LAST_EVALUATION = "last-eval.txt"  # in a run directory: the path of the newest eval.json that evaluated it
METRICS = "metrics"  # the CSV logger's metrics/version_N/metrics.csv
WANDB_RUN_ID = "wandb-run-id"
SUMMARY = "summary.json"
ADAPTER = "adapter"
TOKENIZER = "tokenizer"
EVALUATION = "eval"  # vlmtrain eval's default output folder
RUN_OUTPUTS = (CHECKPOINTS, METRICS, "wandb", WANDB_RUN_ID, SUMMARY, ADAPTER, TOKENIZER, EVALUATION, LAST_EVALUATION)


def last_evaluation(run_dir: Path) -> Path | None:
    """The newest evaluation of a run (``vlmtrain eval`` records where it wrote it), if it still exists."""
    pointer = run_dir / LAST_EVALUATION
    found = Path(pointer.read_text().strip()) if pointer.is_file() else run_dir / EVALUATION / "eval.json"
    return found if found.is_file() else None


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint directory in ``directory``, from its ``latest`` pointer."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    path = directory / pointer.read_text().strip()
    return path if path.is_dir() else None


def resume_checkpoint(recipe: Recipe) -> Path | None:
    """The Lightning state to continue from: ``resume=auto`` takes the run directory's latest complete
    checkpoint (none: start afresh), ``resume=PATH`` that checkpoint directory."""
    if recipe.resume is None:
        return None
    if recipe.resume == "auto":
        checkpoint = latest_checkpoint(Path(recipe.run_dir) / CHECKPOINTS)
        return checkpoint / STATE if checkpoint is not None else None
    path = Path(recipe.resume)
    if not (path / STATE).exists():
        raise RecipeError(f"resume: {str(path)!r} is not a checkpoint directory (with a {STATE!r} inside)")
    return path / STATE
