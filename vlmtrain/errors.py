"""Errors a user fixes from the message alone (:class:`UserError`, defined with the model code that raises it
too) and a run stopped by a signal; the CLI prints each as one line, without a traceback."""

from vlmtrain.modeling.errors import UserError

__all__ = ["RunInterrupted", "UserError"]


class RunInterrupted(Exception):
    """A run stopped by a signal after saving a checkpoint; the message says where to resume from."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number
