"""Pydantic's errors in a policy author's words (``policies/_messages.py``), as the loader and compiler show them."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import Field, ValidationError

from slipway.policies.kinds import NAME_PATTERN, Strict
from slipway.policies.loader import data_path, fields_at, format_path, friendly


class _Doc(Strict):
    n: int = Field(default=1, ge=1)
    mode: Literal["a", "b"] = "a"
    name: str = Field(default="x", pattern=NAME_PATTERN)
    items: list[int] = Field(default=[1], min_length=1)
    sub: dict[str, int | list[int]] = Field(default={})


def _first_error(data: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ValidationError) as e:
        _Doc.model_validate(data)
    return dict(e.value.errors(include_url=False)[0])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"n": 0}, "must be greater than or equal to 1, got 0"),
        ({"mode": "c"}, "must be 'a' or 'b', got 'c'"),
        ({"name": "Bad Name"}, "invalid value 'Bad Name': names use lowercase letters, digits, '.', '_' or '-'"),
        ({"items": []}, "must have at least 1 item, got 0"),
        ({"n": "x"}, "must be a valid integer, unable to parse string as an integer, got 'x'"),
    ],
    ids=["bound", "literal", "name-pattern", "too-short", "type"],
)
def test_friendly_says_what_is_wrong_and_what_was_given(data, message):
    err = _first_error(data)
    assert friendly(err, value=err.get("input")).startswith(message)


def test_data_path_drops_union_member_tags_from_the_location():
    err = _first_error({"sub": {"k": "v"}})
    assert err["loc"] == ("sub", "k", "int")
    assert data_path({"sub": {"k": "v"}}, err["loc"]) == (("sub", "k"), False)


def test_fields_at_lists_the_keys_a_mapping_allows_and_paths_read_as_written():
    assert fields_at(_Doc, ()) == ["n", "mode", "name", "items", "sub"]
    assert format_path(("steps", "train", "with", "files", 0)) == "steps.train.with.files[0]"
