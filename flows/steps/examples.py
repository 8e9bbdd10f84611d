"""Small functions for ``uses: python:...`` steps in the shipped example pipelines and the docs."""

from __future__ import annotations

from pydantic import Field

from slipway.policies.kinds import Strict


class CountInput(Strict):
    text: str = Field(description="Text to count the words of.")


class CountOutput(Strict):
    words: int


def count_words(inp: CountInput) -> CountOutput:
    """Count the words of ``text`` (a python: step needs no context argument)."""
    return CountOutput(words=len(inp.text.split()))
