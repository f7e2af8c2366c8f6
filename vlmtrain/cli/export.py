"""``vlmtrain export``: a run's checkpoint as a folder that loads without the training stack."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> None:
    from vlmtrain.export.write import export

    export(args.source, args.out, keep_adapter=args.keep_adapter, evaluation=args.eval,
           report=lambda line: print(f"exported to {args.out}: {line}; recipe.yaml, README.md"))


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add this group's commands to the ``vlmtrain`` parser."""
    sub = commands.add_parser("export", help="write a run's checkpoint as a folder that loads without the training stack")
    sub.add_argument("source", type=Path, help="a run directory (its latest checkpoint) or a checkpoint directory")
    sub.add_argument("out", type=Path)
    sub.add_argument("--keep-adapter", action="store_true", help="keep LoRA adapters separate instead of merging them")
    sub.add_argument(
        "--eval", type=Path, help="an eval.json (or its folder) for the model card (default: the run's last vlmtrain eval)"
    )
    sub.set_defaults(handler=cmd_export)

