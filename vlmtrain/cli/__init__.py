"""The ``vlmtrain`` command: one small module per command group (:mod:`.train`, :mod:`.data`, :mod:`.export`,
:mod:`.evaluate`), and here what every command shares: the parser, the logs, and how a failure is reported."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from vlmtrain.cli import data, evaluate, export, train
from vlmtrain.errors import RunInterrupted, UserError


def parser() -> argparse.ArgumentParser:
    main = Parser(prog="vlmtrain", description="Train mixed-budget vision encoders for VLMs.")
    commands = main.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (train, data, export, evaluate):
        group.add_commands(commands)
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


PATH_MISTAKES = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def describe(error: BaseException) -> tuple[str, str]:
    """(kind, message in one line) of an error; for one re-raised from a DataLoader worker, the original's."""
    if isinstance(error, PATH_MISTAKES) and error.filename is not None:
        return type(error).__name__, f"{error.filename}: {error.strerror.lower()}"
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at run time: what Hugging Face libraries would fetch, they don't
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
    except (UserError, *PATH_MISTAKES) as error:
        if debug:
            raise
        print(f"error: {describe(error)[1]}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of the output stopped reading (| head): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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


