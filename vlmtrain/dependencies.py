"""What vlmtrain's dependencies print about their own internals, kept out of a user's terminal; imports
nothing heavy, so that the command line can call it before the training stack is imported."""

from __future__ import annotations

import logging
import warnings


class _DropAdverts(logging.Filter):
    """Lightning advertises a cloud logger on every run; users of this framework do not need to see it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_dependencies() -> None:
    """Silence Lightning's advert and warnings that dependencies raise about their own internals."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated")  # inside DeepSpeed
    warnings.filterwarnings("ignore", message=r"When saving the DeepSpeed Stage 3 checkpoint")  # export consolidates
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")  # inside PEFT
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # frozen parts, on purpose
