"""What vlmtrain's dependencies print about their own internals, kept out of a user's terminal; imports
nothing heavy, so that the command line can call it before the training stack is imported."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drops log lines that contain any of ``texts``."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


def quiet_dependencies() -> None:
    """Silence Lightning's advert and warnings that dependencies raise about their own internals."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("litlogger"))  # a cloud advert
    # bitsandbytes (imported by PEFT where installed) looks for a faster CPU kernel on the Hub; offline, it says so
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("from kernels-community"))
    logging.getLogger("kernels._internals.hf_hub").addFilter(_DropMessages("kernels-community/"))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated")  # inside DeepSpeed
    warnings.filterwarnings("ignore", message=r"When saving the DeepSpeed Stage 3 checkpoint")  # export consolidates
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")  # inside PEFT
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # frozen parts, on purpose
