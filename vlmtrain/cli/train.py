"""``vlmtrain fit``, ``validate`` and ``geometry``: training a recipe, checking it, and the budget geometry of a size."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmtrain.cli.arguments import positive_int
from vlmtrain.modeling.geometry import RESIZE_RULES, Geometry, geometry_table, parse_size


def cmd_fit(args: argparse.Namespace) -> None:
    from vlmtrain.config import load_recipe  # reading recipes imports torch (the part registries): not for every command

    recipe = load_recipe(args.recipe, args.overrides)
    from vlmtrain.train.preflight import prepare

    prepared = prepare(recipe, str(args.recipe))  # every check before the training stack is imported
    from lightning.pytorch.utilities import rank_zero_only

    from vlmtrain.train.run import fit

    run_dir = fit(recipe, source=str(args.recipe), prepared=prepared)
    if rank_zero_only.rank == 0:
        print(f"run finished: {run_dir}")


def cmd_validate(args: argparse.Namespace) -> None:
    from vlmtrain.config import load_recipe, recipe_to_yaml

    print(recipe_to_yaml(load_recipe(args.recipe, args.overrides)), end="")


def cmd_geometry(args: argparse.Namespace) -> None:
    height, width = parse_size(args.size)
    geometry = Geometry(patch_size=args.patch, pool=args.pool, rule=args.rule, min_pixels=args.min_pixels)
    print(geometry_table(geometry, height, width))


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add this group's commands to the ``vlmtrain`` parser."""
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
    sub.add_argument("--patch", type=positive_int, default=16, help="pixels per patch (Gemma 4, Qwen3-VL: 16; Qwen2.5-VL: 14)")
    sub.add_argument("--pool", type=positive_int, default=3, help="pool×pool patches per token (Gemma 4: 3, Qwen-VL: 2)")
    sub.add_argument(
        "--rule", choices=RESIZE_RULES, default="fill",
        help="fill: scaled to fill the budget (Gemma 4); smart_resize: Qwen-VL's, max_pixels = budget x cell²",
    )
    sub.add_argument("--min-pixels", type=int, default=0, help="smart_resize: the smallest area (Qwen2.5-VL: 3136)")
    sub.set_defaults(handler=cmd_geometry)

