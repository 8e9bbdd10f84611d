"""Policy errors: every problem found in a document, with the file, line, column and field path."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from slipway.errors import SlipwayError


@dataclass(frozen=True, order=True)
class Issue:
    """One problem in one document: ``FILE:LINE:COL: path: message`` (line and column count from 1)."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        if not self.file:
            return f"{self.path}: {self.message}" if self.path else self.message
        where = f"{self.file}:{self.line}:{self.col}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(SlipwayError, ValueError):
    """One or more documents are malformed; ``issues`` holds every problem found, in file order."""

    def __init__(self, issues: Iterable[Issue] | str):
        if isinstance(issues, str):
            issues = [Issue("", 0, 0, "", issues)]
        self.issues: list[Issue] = sorted(set(issues))
        super().__init__(self._summary())

    def _summary(self) -> str:
        if not self.issues:
            return "invalid policy"
        first = str(self.issues[0])
        more = len(self.issues) - 1
        return f"{first} (and {more} more error{'s' if more > 1 else ''})" if more else first

    def lines(self) -> list[str]:
        return [str(i) for i in self.issues]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(choices: Sequence[str], limit: int = 8) -> str:
    """A short, quoted list for messages: ``'a', 'b' or 'c'``."""
    items = [repr(c) for c in sorted(choices)]
    if len(items) > limit:
        items = [*items[:limit], "..."]
    if len(items) <= 1:
        return "".join(items) or "nothing"
    return ", ".join(items[:-1]) + " or " + items[-1]
