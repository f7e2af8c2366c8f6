"""The budget experiment: one model trained with budgets sampled per batch against one model per fixed
budget, same data and steps, each evaluated at all five budgets.

    python scripts/experiment_budgets.py [--recipe recipes/tiny.yaml] [--steps 300] [--fixed 70,...] [--out runs/budgets]

The claim tested (Matryoshka Multimodal Models, 2024): the mixed-budget model is close to each
fixed-budget model at that model's own budget and much better than a fixed-budget model away from its
budget; detail (small text) needs a high budget while coarse content (large text) does not.
The target is the recipe's (the word), which the demo's ViT learns from its shipped reader weights;
`data.text.target_field=photo` trains on a coarse target instead (which of 12 photos is under the text), which
encoders that do not read (frozen DINOv2: recipes/budgets-dinov2.yaml) learn on CPU.
Every run sees the same 8 images per step (so "same data and steps" holds whatever the budget), drawn
from 4096 rendered samples (written to data/generated/budgets when missing or stale). Runs that already finished
are not trained again. Writes OUT/eval-small/ and OUT/eval-large/ with eval.json, eval.png and results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = [70, 140, 280, 560, 1120]
DATA = ROOT / "data" / "generated" / "budgets"
SAME_BATCHES = [
    "data.batching.max_batch_size=8",
    "data.batching.batch_tokens=9600",
    f"data.train={DATA}/train-{{000000..000031}}.tar",
    f"data.val={DATA}/val-000000.tar",
]


def train(recipe: str, run_dir: Path, levels: list[int], steps: int, overrides: list[str]) -> None:
    if (run_dir / "checkpoints" / "latest").is_file() and (run_dir / "summary.json").is_file():
        print(f"{run_dir} already trained")
        return
    command = [
        sys.executable,
        "-m",
        "vlmtrain.cli",
        "fit",
        recipe,
        f"run_dir={run_dir}",
        "overwrite=true",
        f"budget.levels={levels}",
        "budget.weights=null",
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={steps}",
        f"trainer.val_every={steps}",
        *SAME_BATCHES,
        *overrides,
    ]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def results_markdown(results: dict) -> str:
    """Token accuracy (and exact match) of every model at every budget, small and large text apart."""
    header = "| model | " + " | ".join(str(b) for b in LEVELS) + " |"
    lines = ["Token accuracy (exact match) at each evaluation budget:", "", header, "|---|" + "---:|" * len(LEVELS)]
    for model in results["models"]:
        cells = []
        for row in model["budgets"]:
            exact = "" if row["exact_match"] is None else f" ({row['exact_match']:.0%})"
            cells.append(f"{row['token_accuracy']:.0%}{exact}")
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--fixed", default=",".join(map(str, LEVELS)), help="the budgets that get a fixed-budget model")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "budgets")
    parser.add_argument("--limit", type=int, default=64, help="evaluation samples per text size")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    subprocess.run(
        [sys.executable, "-m", "vlmtrain.cli", "demo-data", "--out", str(DATA), "--train", "4096", "--val", "128", "--seed", "1"],
        check=True,
    )
    runs = {"mixed": LEVELS, **{f"fixed-{b}": [b] for b in map(int, args.fixed.split(","))}}
    for name, levels in runs.items():
        train(args.recipe, args.out / name, levels, args.steps, args.overrides)
    for group in ("small", "large"):
        out = args.out / f"eval-{group}"
        command = [
            sys.executable,
            "-m",
            "vlmtrain.cli",
            "eval",
            *(str(args.out / n) for n in runs),
            "--names",
            ",".join(runs),
            "--data",
            str(DATA / "val-000000.tar"),
            "--budgets",
            ",".join(map(str, LEVELS)),
            "--limit",
            str(args.limit),
            "--where",
            f"size={group}",
            "--out",
            str(out),
        ]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
        results = json.loads((out / "eval.json").read_text())
        (out / "results.md").write_text(results_markdown(results) + "\n")
        print(f"\n{group} text:\n{results_markdown(results)}\n", flush=True)


if __name__ == "__main__":
    main()
