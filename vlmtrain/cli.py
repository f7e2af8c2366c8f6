"""The ``vlmtrain`` command: fit, validate, geometry, shards, export, eval, demo-data, demo-chat."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from vlmtrain.config import load_recipe, recipe_to_yaml
from vlmtrain.errors import RunInterrupted, UserError
from vlmtrain.geometry import Geometry, check_budget, geometry_table, parse_size


def cmd_fit(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    from vlmtrain.train.preflight import prepare

    prepared = prepare(recipe, str(args.recipe))  # every check before the training stack is imported
    from lightning.pytorch.utilities import rank_zero_only

    from vlmtrain.train.run import fit

    run_dir = fit(recipe, source=str(args.recipe), prepared=prepared)
    if rank_zero_only.rank == 0:
        print(f"run finished: {run_dir}")


def cmd_validate(args: argparse.Namespace) -> None:
    print(recipe_to_yaml(load_recipe(args.recipe, args.overrides)), end="")


def cmd_geometry(args: argparse.Namespace) -> None:
    for name in ("patch", "pool"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    height, width = parse_size(args.size)
    print(geometry_table(Geometry(patch_size=args.patch, pool=args.pool), height, width))


def cmd_shards(args: argparse.Namespace) -> None:
    from vlmtrain.data.annotations import read_annotations
    from vlmtrain.data.shards import parse_bytes, write_shards

    max_bytes = parse_bytes(args.shard_size) if args.shard_size else None
    annotations = read_annotations(args.annotations, args.format)  # the whole file, before any image is read
    total = len(annotations.records) + len(annotations.bad)
    if annotations.bad and not args.skip_bad:
        for bad in annotations.bad:
            print(f"error: {bad}", file=sys.stderr)
        raise UserError(f"{len(annotations.bad)} of {total} records are malformed; nothing written (--skip-bad writes the other "
                        f"{len(annotations.records)})")
    for bad in annotations.bad:
        print(f"left out {bad}")
    formats = ", ".join(f"{count} {kind}" for kind, count in sorted(annotations.formats.items()))
    print(f"{args.annotations}: {len(annotations.records)} records ({formats})")
    report = write_shards(
        annotations.records, args.images, args.out, args.prefix, args.samples_per_shard, max_bytes, args.workers,
        progress=True, outside_images=args.allow_outside_images, left_out=[str(bad) for bad in annotations.bad],
    )
    print(f"wrote {report.samples} samples in {len(report.shards)} shards to {args.out} (index: {args.prefix}-index.json)")
    for key, reason in report.rejected:
        print(f"rejected {key}: {reason}")


def cmd_export(args: argparse.Namespace) -> None:
    from vlmtrain.export import export

    export(args.source, args.out, keep_adapter=args.keep_adapter, evaluation=args.eval,
           report=lambda line: print(f"exported to {args.out}: {line}; recipe.yaml, README.md"))


def cmd_eval(args: argparse.Namespace) -> None:
    from vlmtrain.evaluate import evaluate, log_to_wandb
    from vlmtrain.export import results_table

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
    from vlmtrain.evaluate import open_model
    from vlmtrain.selector.labels import label_budgets

    labels = label_budgets(open_model(args.model), expand_shards(args.data), args.limit, parse_where(args.where))
    labels.save(args.out)
    images, levels = labels.features.shape[0], len(labels.levels)
    print(f"labelled {images} images ({len(set(labels.keys))} samples) at {levels} levels in {labels.seconds:.1f} s "
          f"({labels.seconds / max(images, 1) * 1000:.1f} ms per image, all levels): {args.out}")
    means = labels.losses.mean(dim=0).tolist()
    print("mean loss per level: " + ", ".join(f"{level}: {loss:.3f}" for level, loss in zip(labels.levels, means, strict=True)))


def cmd_train_selector(args: argparse.Namespace) -> None:
    from vlmtrain.inference import SELECTOR_DIR, load
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
    """``--budgets 70,280,1120,auto,auto:0.2`` → [70, 280, 1120, "auto", "auto:0.2"]; anything else is one
    line naming what is wrong."""
    from vlmtrain.inference import auto_tolerance

    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() or part.startswith("auto") for part in parts):
        raise UserError(f"--budgets {text!r} must be token levels or auto[:TOL] separated by commas, e.g. 70,280,1120,auto")
    budgets: list[int | str] = [int(part) if part.isdigit() else part for part in parts]
    for budget in budgets:
        if isinstance(budget, int):
            check_budget(budget)
        else:
            auto_tolerance(budget)
    return budgets


def cmd_demo_data(args: argparse.Namespace) -> None:
    from vlmtrain.data.demo import demo_is_current, demo_manifest, make_demo_shards

    if not args.force and demo_is_current(args.out, demo_manifest(args.train, args.val, args.seed, args.samples_per_shard)):
        print(f"{args.out} already holds this demo set (--force renders it again)")
        return
    reports = make_demo_shards(args.out, args.train, args.val, args.seed, args.samples_per_shard)
    for split, report in reports.items():
        print(f"{split}: {report.samples} samples in {len(report.shards)} shards under {args.out}")


def cmd_demo_chat(args: argparse.Namespace) -> None:
    from vlmtrain.data.demo_chat import make_chat_set

    files = make_chat_set(args.out, args.train, args.val)
    print(
        f"wrote {', '.join(str(path) for path in files.values())} (LLaVA JSON) and {args.out / 'images'}; next: vlmtrain shards "
        f"{files['train']} {args.out} --images {args.out / 'images'} --prefix train --samples-per-shard 128"
    )


def parser() -> argparse.ArgumentParser:
    main = Parser(prog="vlmtrain", description="Train mixed-budget vision encoders for VLMs.")
    commands = main.add_subparsers(dest="command", required=True, parser_class=Parser)

    for name, handler, text in (
        ("fit", cmd_fit, "train a recipe"),
        ("validate", cmd_validate, "check a recipe and print it resolved"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("recipe", type=Path)
        sub.add_argument("overrides", nargs="*", help="key=value, e.g. trainer.max_steps=100")
        sub.set_defaults(handler=handler)

    sub = commands.add_parser("geometry", help="resize, patches and tokens of an image size at every budget")
    sub.add_argument("size", help="WIDTHxHEIGHT, e.g. 1024x768")
    sub.add_argument("--patch", type=int, default=16, help="patch size in pixels (Gemma 4: 16)")
    sub.add_argument("--pool", type=int, default=3, help="pool×pool patches per token (Gemma 4: 3)")
    sub.set_defaults(handler=cmd_geometry)

    sub = commands.add_parser("shards", help="write WebDataset shards from images and annotations (records, LLaVA, messages)")
    sub.add_argument("annotations", type=Path, help="JSON Lines, a JSON array (LLaVA) or CSV (an images column: a.jpg;b.jpg)")
    sub.add_argument("out", type=Path)
    sub.add_argument("--images", type=Path, default=Path("."), help="folder the image paths are relative to")
    sub.add_argument(
        "--format",
        default="auto",
        choices=("auto", "records", "llava", "messages"),
        help="record format (auto: told by each record's keys)",
    )
    sub.add_argument(
        "--skip-bad", action="store_true", help="write the good records and list the malformed ones (default: write nothing)"
    )
    sub.add_argument(
        "--allow-outside-images", action="store_true", help="read image paths outside --images (.., absolute, symlinks)"
    )
    sub.add_argument("--prefix", default="shard")
    sub.add_argument("--samples-per-shard", type=int, default=10000)
    sub.add_argument("--shard-size", help="close a shard before it passes this size, e.g. 512MB")
    sub.add_argument("--workers", type=int, default=1, help="processes reading and checking images")
    sub.set_defaults(handler=cmd_shards)

    sub = commands.add_parser("export", help="write a run's checkpoint as a folder that loads without the training stack")
    sub.add_argument("source", type=Path, help="a run directory (its latest checkpoint) or a checkpoint directory")
    sub.add_argument("out", type=Path)
    sub.add_argument("--keep-adapter", action="store_true", help="keep LoRA adapters separate instead of merging them")
    sub.add_argument(
        "--eval", type=Path, help="an eval.json (or its folder) for the model card (default: the run's last vlmtrain eval)"
    )
    sub.set_defaults(handler=cmd_export)

    sub = commands.add_parser("eval", help="quality and cost of one or several models at each budget, on the same shards")
    sub.add_argument("models", type=Path, nargs="+", help="export folders or run directories")
    sub.add_argument("--data", required=True, help="shard spec, e.g. data/generated/demo/val-000000.tar")
    sub.add_argument(
        "--budgets",
        help="comma-separated levels, and auto or auto:TOL for the model's budget selector, e.g. 70,280,1120,auto,auto:0.2 "
        "(default: every level the model serves)",
    )
    sub.add_argument("--limit", type=int, default=64, help="samples per budget")
    sub.add_argument("--names", help="comma-separated names for the models (default: folder names)")
    sub.add_argument("--out", type=Path, help="folder for eval.json and eval.png (default: FIRST_MODEL/eval)")
    sub.add_argument("--no-generate", action="store_true", help="skip generation: no exact match or word recall, faster")
    sub.add_argument("--max-new-tokens", type=int, default=16)
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
    sub.add_argument("--limit", type=int, default=256, help="samples to label")
    sub.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE", help="only samples with FIELD=VALUE")
    sub.add_argument("--out", type=Path, required=True, help="folder for labels.json and labels.safetensors")
    sub.set_defaults(handler=cmd_label_budgets)

    sub = commands.add_parser("train-selector", help="train the budget selector of an export on budget labels")
    sub.add_argument("export", type=Path, help="the export folder (the selector is written into it)")
    sub.add_argument("--labels", type=Path, required=True, help="a folder written by label-budgets")
    sub.add_argument("--steps", type=int, default=400)
    sub.add_argument("--hidden", type=int, default=64)
    sub.set_defaults(handler=cmd_train_selector)

    sub = commands.add_parser("demo-data", help="render the demo task (words on real photos) into shards")
    sub.add_argument("--out", type=Path, default=Path("data/generated/demo"))
    sub.add_argument("--train", type=int, default=2048)
    sub.add_argument("--val", type=int, default=64)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--samples-per-shard", type=int, default=128)
    sub.add_argument("--force", action="store_true", help="render even when OUT already holds this set")
    sub.set_defaults(handler=cmd_demo_data)

    sub = commands.add_parser("demo-chat", help="write the chat demo: two-image conversations as LLaVA JSON, with their images")
    sub.add_argument("--out", type=Path, default=Path("data/generated/chat"))
    sub.add_argument("--train", type=int, default=640)
    sub.add_argument("--val", type=int, default=32)
    sub.set_defaults(handler=cmd_demo_chat)
    return main


def show_logs() -> None:
    """vlmtrain's own log lines (what a run skipped, where it starts from) go to stderr, one per line."""
    logger = logging.getLogger("vlmtrain")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def describe(error: BaseException) -> tuple[str, str]:
    """(kind, message in one line) of an error; for one re-raised from a DataLoader worker, the original's."""
    text = str(error).strip()
    kind = type(error).__name__
    if "Original Traceback" in text:  # torch wraps a worker's exception with the worker's traceback
        kind, _, text = text.splitlines()[-1].partition(": ")
        kind = kind.rsplit(".", 1)[-1]
    return kind, (text.splitlines()[0] if text else kind)


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (and exit code 2), like every other mistake."""

    def error(self, message: str) -> None:
        size = next((arg for arg in sys.argv[2:] if re.fullmatch(r"-\d+x-?\d+", arg)), None)
        hint = f" ({size}: an image size must be positive, WIDTHxHEIGHT)" if size else ""
        print(f"error: {self.prog}: {message}{hint}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user's mistake is one line on stderr and exit code 2, an interrupted run names its
    checkpoint (exit 128 + the signal), any other failure is one line and exit code 1; ``--debug`` or
    ``VLMTRAIN_DEBUG=1`` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("VLMTRAIN_DEBUG", "") not in ("", "0") or "--debug" in argv
    args = parser().parse_args([arg for arg in argv if arg != "--debug"])
    show_logs()
    if args.command in ("fit", "export", "eval", "label-budgets"):
        import torch

        from vlmtrain.dependencies import quiet_dependencies

        if not torch.cuda.is_available():  # what DeepSpeed would pick, said so it does not warn about it
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        quiet_dependencies()  # building a model with LoRA (export, eval) warns like training does
    try:
        args.handler(args)
    except (UserError, FileNotFoundError) as error:
        if debug:
            raise
        print(f"error: {describe(error)[1]}", file=sys.stderr)
        return 2
    except RunInterrupted as interrupted:
        print(f"stopped: {interrupted}", file=sys.stderr)
        return interrupted.exit_code
    except Exception as error:  # a failure of the run itself: one line, the traceback on demand
        if debug:
            raise
        kind, message = describe(error)
        print(f"error: {kind}: {message} (VLMTRAIN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
