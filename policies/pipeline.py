"""The ``Pipeline`` kind: a DAG of steps, each using a step type, wired by ``needs`` and ``${{ }}``.

Only the shape is checked here; what needs the step types (inputs, outputs, references between steps) is
checked by :mod:`slipway.flows.compiler`, which the loader runs for every Pipeline it loads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, field_validator

from slipway.policies.kinds import Document, Strict, register_kind

STEP_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
PARAM_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
StepName = Annotated[str, StringConstraints(pattern=STEP_NAME_PATTERN)]
ParamName = Annotated[str, StringConstraints(pattern=PARAM_NAME_PATTERN)]
ParamType = Literal["string", "integer", "number", "boolean", "object", "array"]

PYTHON_PREFIX = "python:"
USES_PATTERN = r"^(?:[a-z][a-z0-9_]*|python:[A-Za-z_][\w.]*:[A-Za-z_]\w*)$"


class Param(Strict):
    """A pipeline parameter, given with ``slipway run --param NAME=VALUE`` or by a deployment."""

    type: ParamType = Field(default="string", description="JSON type of the value. Default string.")
    default: Any = Field(default=None, description="Value when none is given. Without a default the param is required.")
    required: bool | None = Field(
        default=None, description="Whether a value must be given. Default: true when there is no default."
    )
    description: str = Field(default="", description="Free text for people. Default empty.")

    @property
    def is_required(self) -> bool:
        return self.required if self.required is not None else ("default" not in self.model_fields_set)


class Step(Strict):
    """One node of the DAG."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    uses: str = Field(
        pattern=USES_PATTERN,
        description="Step type: a registered name (e.g. finetune, approve) or python:package.module:function.",
    )
    needs: list[StepName] = Field(
        default_factory=list, description="Steps that must finish first (one name or a list). Default none."
    )
    with_: dict[str, Any] = Field(
        default_factory=dict,
        alias="with",
        description="Inputs of the step type; values may hold ${{ params.X }} or ${{ steps.S.outputs.Y }}. Default {}.",
    )
    if_: str | None = Field(
        default=None,
        alias="if",
        description="Condition; the step is skipped when false. Default: all needs succeeded (success()).",
    )
    retries: int = Field(default=0, ge=0, le=20, description="Extra attempts after a failure, 0-20. Default 0.")
    retry_delay: float = Field(default=0.0, ge=0, le=3600, description="Seconds between attempts, 0-3600. Default 0.")
    timeout: float | None = Field(
        default=None, gt=0, le=7 * 24 * 3600, description="Seconds an attempt may take (max 7 days). Default none."
    )
    description: str = Field(default="", description="Free text for people. Default empty.")

    @field_validator("needs", mode="before")
    @classmethod
    def needs_may_be_one_name(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def is_python(self) -> bool:
        return self.uses.startswith(PYTHON_PREFIX)


@register_kind
class Pipeline(Document):
    """A DAG of steps run by Prefect; every run and step is recorded in the registry."""

    kind: Literal["Pipeline"] = "Pipeline"
    model: str | None = Field(default=None, description="Model the pipeline works on, if any. Default none.")
    params: dict[ParamName, Param] = Field(default_factory=dict, description="Declared parameters. Default none.")
    steps: dict[StepName, Step] = Field(min_length=1, description="The steps, by name (at least one).")
    max_parallel: int | None = Field(
        default=None, ge=1, le=256, description="Most steps running at once, 1-256. Default: no limit."
    )
