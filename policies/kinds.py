"""The registry of document kinds. Every YAML document is ``apiVersion: slipway/v1``, a ``kind`` and a ``name``.

A kind is a frozen pydantic model registered with :func:`register_kind`; fields that name another
document carry ``DocRef`` metadata so the loader can check the reference across a directory::

    @register_kind
    class GatePolicy(Document):
        kind: Literal["GatePolicy"] = "GatePolicy"
        suite: Annotated[str, DocRef("EvalSuite")] = Field(description="EvalSuite to gate on.")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

API_VERSION = "slipway/v1"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,127}$"


class Strict(BaseModel):
    """Base of every policy model: frozen, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Document(Strict):
    """Fields shared by every document kind."""

    apiVersion: Literal["slipway/v1"] = Field(description="Schema version of the document; always slipway/v1.")
    kind: str = Field(description="Document kind, e.g. Pipeline, GatePolicy.")
    name: str = Field(pattern=NAME_PATTERN, description="Unique name of the document within its kind.")
    description: str = Field(default="", description="Free text for people. Default empty.")

    # Where the document was loaded from ("path:line"); set by the loader, not part of the schema.
    source: ClassVar[str | None] = None


@dataclass(frozen=True)
class DocRef:
    """Marks a string field as the name of another document of ``kind`` (checked by the loader)."""

    kind: str


KINDS: dict[str, type[Document]] = {}
D = TypeVar("D", bound=type[Document])


def register_kind(cls: D) -> D:
    """Class decorator: make ``cls`` loadable under its ``kind`` literal."""
    default = cls.model_fields["kind"].default
    if not isinstance(default, str):
        raise TypeError(f"{cls.__name__} must declare kind: Literal['{cls.__name__}'] = '{cls.__name__}'")
    KINDS[default] = cls
    return cls
