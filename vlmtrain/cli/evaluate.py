"""``vlmtrain eval``, ``label-budgets`` and ``train-selector``: quality and cost per budget, and the budget selector."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmtrain.cli.arguments import folder, positive_int
from vlmtrain.errors import UserError
from vlmtrain.modeling.geometry import check_budget


def cmd_eval(args: argparse.Namespace) -> None:
    from vlmtrain.evaluate import evaluate
    from vlmtrain.evaluate.plot import log_to_wandb
    from vlmtrain.export.card import results_table

    budgets = parse_budgets(args.budgets) if args.budgets else None
    names = args.names.split(",") if args.names else None
    out = args.out or args.models[0] / "eval"
    where = parse_where(args.where)
    text = {name: getattr(args, name) for name in ("prompt", "prompt_field", "target_field") if getattr(args, name) is not None}
    results = evaluate(
        args.models,
        args.data,
        budgets,
        args.limit,
        out,
        names,
        generate=not args.no_generate,
        max_new_tokens=args.max_new_tokens,
        where=where,
        text=text,
    )
    for model in results["models"]:
        print(f"{model['name']} ({model['path']}):")
        for warning in model["warnings"]:
            print(f"warning: {warning}")
        print(results_table(model))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")
    if args.wandb:
        log_to_wandb(results, out, args.wandb_project, offline=not args.wandb_online)


def cmd_label_budgets(args: argparse.Namespace) -> None:
    from vlmtrain.data.sources import expand_shards
    from vlmtrain.inference import open_model
    from vlmtrain.selector.labels import label_budgets

    labels = label_budgets(open_model(args.model), expand_shards(args.data), args.limit, parse_where(args.where))
    labels.save(args.out)
    images, levels = labels.features.shape[0], len(labels.levels)
    print(f"labelled {images} images ({len(set(labels.keys))} samples) at {levels} levels in {labels.seconds:.1f} s "
          f"({labels.seconds / max(images, 1) * 1000:.1f} ms per image, all levels): {args.out}")
    means = labels.losses.mean(dim=0).tolist()
    print("mean loss per level: " + ", ".join(f"{level}: {loss:.3f}" for level, loss in zip(labels.levels, means, strict=True)))


def cmd_train_selector(args: argparse.Namespace) -> None:
    from vlmtrain.export.format import SELECTOR_DIR
    from vlmtrain.inference import load
    from vlmtrain.selector.labels import BudgetLabels
    from vlmtrain.selector.train import train_selector

    labels = BudgetLabels.read(args.labels)
    levels = list(load(args.export).geometry.levels)
    if labels.levels != levels:
        raise UserError(f"{args.labels}: labels for levels {labels.levels}, but {args.export} serves {levels}")
    selector, report = train_selector(labels, steps=args.steps, hidden=args.hidden)
    selector.save(args.export / SELECTOR_DIR)
    (args.export / SELECTOR_DIR / "report.json").write_text(json.dumps(report, indent=1))
    print(f"selector ({sum(p.numel() for p in selector.parameters()):,} parameters) written to {args.export / SELECTOR_DIR}: "
          + ", ".join(f"{name} {value:.4g}" for name, value in report.items()))


def parse_where(conditions: list[str]) -> dict[str, str]:
    """``--where FIELD=VALUE`` options as a dict; anything else is one line."""
    if any("=" not in condition for condition in conditions):
        raise UserError(f"--where takes FIELD=VALUE, got {conditions}")
    return dict(condition.split("=", 1) for condition in conditions)


def parse_budgets(text: str) -> list[int | str]:
    """``--budgets 70,280,1120,auto,auto:0.2,record`` → [70, 280, 1120, "auto", "auto:0.2", "record"]; anything
    else is one line naming what is wrong."""
    from vlmtrain.evaluate.metrics import RECORD
    from vlmtrain.inference import auto_tolerance

    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() or part.startswith("auto") or part == RECORD for part in parts):
        raise UserError(
            f"--budgets {text!r} must be token levels, auto[:TOL] or record separated by commas, e.g. 70,280,1120,auto,record"
        )
    budgets: list[int | str] = [int(part) if part.isdigit() else part for part in parts]
    for budget in budgets:
        if isinstance(budget, int):
            check_budget(budget)
        elif budget != RECORD:
            auto_tolerance(budget)
    return budgets


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add this group's commands to the ``vlmtrain`` parser."""
    sub = commands.add_parser("eval", help="quality and cost of one or several models at each budget, on the same shards")
    sub.add_argument("models", type=Path, nargs="+", help="export folders or run directories")
    sub.add_argument("--data", required=True, help="shard spec, e.g. data/generated/demo/val-000000.tar")
    sub.add_argument(
        "--budgets",
        help="comma-separated levels, auto or auto:TOL for the model's budget selector, and record for the budgets the "
        "samples' records fix (a video's key frames), e.g. 70,280,1120,auto,auto:0.2,record "
        "(default: every level the model serves)",
    )
    sub.add_argument("--limit", type=positive_int, default=64, help="samples per budget")
    sub.add_argument("--names", help="comma-separated names for the models (default: folder names)")
    sub.add_argument("--out", type=folder, help="folder for eval.json and eval.png (default: FIRST_MODEL/eval)")
    sub.add_argument("--no-generate", action="store_true", help="skip generation: no exact match or word recall, faster")
    sub.add_argument("--max-new-tokens", type=positive_int, default=16)
    sub.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="only samples whose record has FIELD=VALUE (repeatable)",
    )
    sub.add_argument("--prompt", help="the prompt for prompt/target records, <image> where the images go (default: training's)")
    sub.add_argument("--prompt-field", help="the record field holding each sample's prompt (default: training's)")
    sub.add_argument("--target-field", help="the record field holding each sample's target (default: training's)")
    sub.add_argument("--wandb", action="store_true", help="also log the table and plot to W&B")
    sub.add_argument("--wandb-project", default="vlmtrain")
    sub.add_argument("--wandb-online", action="store_true", help="log online (default: offline)")
    sub.set_defaults(handler=cmd_eval)

    sub = commands.add_parser("label-budgets", help="the model's loss at every level on each sample: the selector's labels")
    sub.add_argument("model", type=Path, help="an export folder or a run directory")
    sub.add_argument("--data", required=True, help="shard spec, e.g. data/generated/demo/train-{000000..000003}.tar")
    sub.add_argument("--limit", type=positive_int, default=256, help="samples to label")
    sub.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE", help="only samples with FIELD=VALUE")
    sub.add_argument("--out", type=folder, required=True, help="folder for labels.json and labels.safetensors")
    sub.set_defaults(handler=cmd_label_budgets)

    sub = commands.add_parser("train-selector", help="train the budget selector of an export on budget labels")
    sub.add_argument("export", type=Path, help="the export folder (the selector is written into it)")
    sub.add_argument("--labels", type=Path, required=True, help="a folder written by label-budgets")
    sub.add_argument("--steps", type=positive_int, default=400)
    sub.add_argument("--hidden", type=positive_int, default=64)
    sub.set_defaults(handler=cmd_train_selector)

