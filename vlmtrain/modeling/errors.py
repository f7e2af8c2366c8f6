"""Errors a user fixes from the message alone; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Base of errors caused by input the user controls: recipes, budgets, annotation files, paths."""
