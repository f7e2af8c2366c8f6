"""Errors a user fixes from the message alone; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Base of errors caused by input the user controls: recipes, budgets, annotation files, paths."""


class RunInterrupted(Exception):
    """A run stopped by a signal after saving a checkpoint; the message says where to resume from."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number
