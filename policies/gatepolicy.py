"""The ``GatePolicy`` kind: rules a candidate must pass against the champion to be promoted."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from slipway.policies.kinds import DocRef, Document, Strict, register_kind


class RegressionBound(Strict):
    max_drop: float = Field(ge=0.0, description="Largest allowed drop of the candidate's mean below the champion's.")
    relative: bool = Field(default=False, description="max_drop is a fraction of the champion's mean. Default false.")


class GateRule(Strict):
    metric: str = Field(description="Metric name as produced by the EvalSuite.")
    suite: Annotated[str | None, DocRef("EvalSuite")] = Field(
        default=None, description="EvalSuite the metric comes from. Default: the one evaluation that has it."
    )
    min: float | None = Field(default=None, description="Candidate mean must be >= min. Default no bound.")
    max: float | None = Field(default=None, description="Candidate mean must be <= max. Default no bound.")
    regression: RegressionBound | None = Field(default=None, description="Bound on the drop vs the champion.")
    mode: Literal["superiority", "non_inferiority"] | None = Field(
        default=None,
        description="Statistical comparison with the champion on the same examples. Default none (bounds only).",
    )
    margin: float = Field(default=0.0, ge=0.0, description="non_inferiority: how much worse is still acceptable.")
    test: Literal["auto", "bootstrap", "mcnemar"] = Field(
        default="auto",
        description="auto: McNemar's exact test for binary metrics under superiority, else paired bootstrap.",
    )
    higher_is_better: bool | None = Field(default=None, description="Direction. Default: the metric's own.")

    @model_validator(mode="after")
    def bounds_are_ordered_and_modes_complete(self) -> GateRule:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        if self.mode == "non_inferiority" and self.margin <= 0:
            raise ValueError("non_inferiority needs a margin > 0")
        if self.mode is None and self.min is None and self.max is None and self.regression is None:
            raise ValueError("a rule needs at least one of min, max, regression or mode")
        return self


class ApprovalRequirement(Strict):
    role: str = Field(description="Role whose members may approve.")
    count: int = Field(default=1, ge=1, le=10, description="Distinct approvers needed. Default 1.")
    timeout_s: int = Field(default=86_400, ge=1, description="How long the run waits for approval. Default 1 day.")


@register_kind
class GatePolicy(Document):
    """Promotion criteria decided with paired statistics at a stated confidence."""

    kind: Literal["GatePolicy"] = "GatePolicy"
    rules: list[GateRule] = Field(min_length=1, description="Every rule must pass.")
    confidence: float = Field(default=0.95, ge=0.5, le=0.999, description="Confidence level. Default 0.95.")
    min_samples: int = Field(
        default=30, ge=1, description="Below this many paired examples the gate refuses to decide. Default 30."
    )
    correction: Literal["holm", "none"] = Field(
        default="holm", description="Multiple-comparison correction across statistical rules. Default holm."
    )
    resamples: int = Field(default=10_000, ge=1000, le=200_000, description="Bootstrap resamples. Default 10000.")
    require_approval: ApprovalRequirement | None = Field(
        default=None, description="Pause for human approval after the rules pass. Default none."
    )
