"""Errors a user fixes from the message alone, and the small rules that raise them; the CLI prints them as
one line, without a traceback."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Base of errors caused by input the user controls: recipes, budgets, annotation files, paths."""


class InvalidSetting(UserError, ValueError):
    """A setting that breaks a rule: ``key`` names it (dotted, relative to the section that checked it)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def under(self, section: str) -> InvalidSetting:
        """The same problem, its key seen from the enclosing ``section`` (e.g. ``model.vision``)."""
        return InvalidSetting(f"{section}.{self.key}" if self.key else section, self.message)


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`InvalidSetting` at ``key`` unless ``condition``."""
    if not condition:
        raise InvalidSetting(key, message)


def one_of(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    """``value`` must be one of ``choices``; the message names the closest."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    require(value in choices, key, f"{value!r} is not one of {', '.join(choices)}{hint}")


def positive(key: str, value: float, allow_zero: bool = False) -> None:
    """``value`` must be > 0 (or >= 0)."""
    require(value > 0 or (allow_zero and value == 0), key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")
