"""``DataSuite``: declarative data expectations, run with Great Expectations by the ``validate_data`` step.

```yaml
apiVersion: slipway/v1
kind: DataSuite
name: chat-sft
columns: [id, prompt, completion]          # required columns
rows: {min: 100, max: 1000000}             # row-count bounds
expectations:
  - notNull: {column: completion}
  - unique: {column: id}
  - length: {column: prompt, min: 10, max: 2000}
  - match: {column: completion, regex: '^ \\{.*\\}$'}
  - notMatch: {column: prompt, regex: '[\\w.+-]+@[\\w-]+\\.\\w+', label: email}
```

Each list item sets one expectation (one key), the way Argo Rollouts steps set one thing.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from slipway.policies.kinds import Document, Strict, register_kind


class Bounds(Strict):
    min: int | None = Field(default=None, ge=0, description="Inclusive lower bound. Default: none.")
    max: int | None = Field(default=None, ge=0, description="Inclusive upper bound. Default: none.")

    @model_validator(mode="after")
    def min_not_above_max(self) -> Bounds:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        return self


class ColumnCheck(Strict):
    column: str = Field(min_length=1, description="Column the expectation applies to.")
    mostly: float = Field(
        default=1.0, gt=0, le=1, description="Share of rows that must satisfy it, in (0, 1]. Default 1 (all)."
    )
    label: str | None = Field(default=None, description="Name shown in reports, e.g. 'email'. Default: derived.")


class LengthCheck(ColumnCheck, Bounds):
    """String length of every non-null value within [min, max]."""


class RegexCheck(ColumnCheck):
    regex: str = Field(min_length=1, description="Python regular expression, searched anywhere in the value.")

    @field_validator("regex")
    @classmethod
    def regex_compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"invalid regular expression: {e}") from e
        return value


class NotNull(Strict):
    notNull: ColumnCheck = Field(description="No null (missing) values in the column.")


class Unique(Strict):
    unique: ColumnCheck = Field(description="Every value of the column is distinct.")


class Length(Strict):
    length: LengthCheck = Field(description="Value lengths within bounds.")


class Match(Strict):
    match: RegexCheck = Field(description="Every non-null value matches the regex.")


class NotMatch(Strict):
    notMatch: RegexCheck = Field(description="No value matches the regex (PII, secrets, ...).")


_KEYS = ("notNull", "unique", "length", "match", "notMatch")


def _expectation_key(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        key = next(iter(value))
        return key if key in _KEYS else None
    if isinstance(value, Strict):
        return next(iter(type(value).model_fields))
    return None


Expectation = Annotated[
    Annotated[NotNull, Tag("notNull")]
    | Annotated[Unique, Tag("unique")]
    | Annotated[Length, Tag("length")]
    | Annotated[Match, Tag("match")]
    | Annotated[NotMatch, Tag("notMatch")],
    Discriminator(
        _expectation_key,
        custom_error_type="expectation",
        custom_error_message=f"each expectation is one of {', '.join(_KEYS)} with its settings",
    ),
]


@register_kind
class DataSuite(Document):
    """What a dataset must satisfy before anything trains on it."""

    kind: Literal["DataSuite"] = "DataSuite"
    columns: list[str] = Field(default_factory=list, description="Columns that must exist. Default: none.")
    rows: Bounds | None = Field(default=None, description="Bounds on the number of rows. Default: no bounds.")
    expectations: list[Expectation] = Field(default_factory=list, description="Column expectations, in order.")

    @model_validator(mode="after")
    def has_something_to_check(self) -> DataSuite:
        if not (self.columns or self.rows or self.expectations):
            raise ValueError("a DataSuite needs columns, rows or expectations")
        return self
