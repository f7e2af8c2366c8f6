"""The ``vlmtrain`` command: fit, validate, geometry, shards, export, eval, demo-data, demo-chat."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmtrain.config import load_recipe, recipe_to_yaml
from vlmtrain.errors import UserError
from vlmtrain.geometry import Geometry, geometry_table, parse_size


def cmd_fit(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    from lightning.pytorch.utilities import rank_zero_only

    from vlmtrain.train.run import fit  # heavy imports only once the recipe is known to be valid

    run_dir = fit(recipe)
    if rank_zero_only.rank == 0:
        print(f"run finished: {run_dir}")


def cmd_validate(args: argparse.Namespace) -> None:
    print(recipe_to_yaml(load_recipe(args.recipe, args.overrides)), end="")


def cmd_geometry(args: argparse.Namespace) -> None:
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

    out = export(args.source, args.out, keep_adapter=args.keep_adapter, evaluation=args.eval)
    print(f"exported to {out}: lm/ (Hugging Face), vision/ (safetensors + config), recipe.yaml, README.md")


def cmd_eval(args: argparse.Namespace) -> None:
    from vlmtrain.evaluate import evaluate, log_to_wandb
    from vlmtrain.export import results_table

    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else None
    names = args.names.split(",") if args.names else None
    out = args.out or args.models[0] / "eval"
    if any("=" not in condition for condition in args.where):
        raise UserError(f"--where takes FIELD=VALUE, got {args.where}")
    where = dict(condition.split("=", 1) for condition in args.where)
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
    )
    for model in results["models"]:
        print(f"{model['name']} ({model['path']}):")
        print(results_table(model))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")
    if args.wandb:
        log_to_wandb(results, out, args.wandb_project, offline=not args.wandb_online)


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
    main = argparse.ArgumentParser(prog="vlmtrain", description="Train mixed-budget vision encoders for VLMs.")
    commands = main.add_subparsers(dest="command", required=True)

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
    sub.add_argument("--eval", type=Path, help="an eval.json whose per-budget table goes into the model card")
    sub.set_defaults(handler=cmd_export)

    sub = commands.add_parser("eval", help="quality and cost of one or several models at each budget, on the same shards")
    sub.add_argument("models", type=Path, nargs="+", help="export folders or run directories")
    sub.add_argument("--data", required=True, help="shard spec, e.g. data/generated/demo/val-000000.tar")
    sub.add_argument("--budgets", help="comma-separated, e.g. 70,280,1120 (default: every level the model serves)")
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
    sub.add_argument("--wandb", action="store_true", help="also log the table and plot to W&B")
    sub.add_argument("--wandb-project", default="vlmtrain")
    sub.add_argument("--wandb-online", action="store_true", help="log online (default: offline)")
    sub.set_defaults(handler=cmd_eval)

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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.handler(args)
    except (UserError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
