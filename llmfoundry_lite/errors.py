"""User-facing errors: one line naming the recipe file and key path; the CLI maps them to exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RecipeError(Exception):
    """A mistake in a recipe, an override or a CLI argument that the user can fix."""

    def __init__(self, message: str, file: str | None = None, key: str | None = None, absolute: bool = False):
        self.file = file
        self.key = key
        # ``key`` is a full recipe path: a component that raises it must not prefix its own path.
        self.absolute = absolute
        self.detail = message
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


def suggest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'x'?)' for the closest choices, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message (or of a text); the exception's type when it has none."""
    text = str(exc)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__ if isinstance(exc, BaseException) else ""
