"""The ``CanaryPlan`` kind: ordered steps that each set one thing, and the analysis that judges each window.

Shaped after Argo Rollouts (``- setWeight: 10``, ``- pause``) and Flagger's metric checks
(``{name, thresholdRange: {min|max}}``), with bounds relative to the champion measured in the same window.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from slipway.policies.kinds import DocRef, Document, Strict, register_kind


class ThresholdRange(Strict):
    min: float | None = Field(default=None, description="The canary's value must be >= min. Default no bound.")
    max: float | None = Field(default=None, description="The canary's value must be <= max. Default no bound.")


class RelativeBound(Strict):
    max_ratio: float | None = Field(
        default=None, gt=0, description="Canary value <= champion value x max_ratio (same window). Default none."
    )
    max_increase: float | None = Field(
        default=None, ge=0, description="Canary value <= champion value + max_increase (same window). Default none."
    )
    max_decrease: float | None = Field(
        default=None,
        ge=0,
        description="Canary value >= champion value - max_decrease (for quality, where higher is better). "
        "Default none.",
    )


class AnalysisMetric(Strict):
    name: Literal[
        "error_rate", "latency_p50", "latency_p90", "latency_p99", "ttft_p50", "ttft_p90", "ttft_p99", "quality"
    ] = Field(description="error_rate, latency/TTFT percentiles (ms) from the gateway, or quality (online eval).")
    thresholdRange: ThresholdRange | None = Field(default=None, description="Absolute bounds on the canary's value.")
    relative: RelativeBound | None = Field(default=None, description="Bound relative to the champion, same window.")
    suite: Annotated[str | None, DocRef("EvalSuite")] = Field(
        default=None, description="quality: the EvalSuite whose examples probe the canary."
    )
    metric: str | None = Field(default=None, description="quality: the suite's metric used as the score.")
    sample: int = Field(default=8, ge=1, le=256, description="quality: examples probed per window. Default 8.")

    @model_validator(mode="after")
    def has_a_bound_and_quality_has_its_suite(self) -> AnalysisMetric:
        if self.thresholdRange is None and self.relative is None:
            raise ValueError(f"metric {self.name} needs thresholdRange and/or relative")
        if self.name == "quality" and (self.suite is None or self.metric is None):
            raise ValueError("quality needs `suite` and `metric`")
        return self


class Analysis(Strict):
    interval_s: float = Field(default=1.0, gt=0, le=600, description="How often windows are judged. Default 1 s.")
    window_s: float = Field(
        default=10.0, gt=0, le=3600, description="A window: the last N seconds of canary and champion. Default 10 s."
    )
    min_requests: int = Field(
        default=10, ge=1, description="Fewer canary requests in a window: no verdict. Default 10."
    )
    failure_limit: int = Field(
        default=2, ge=1, le=100, description="Consecutive failed windows that trigger rollback. Default 2."
    )
    metrics: list[AnalysisMetric] = Field(min_length=1, description="Checks applied to every window.")


class Breaker(Strict):
    consecutive_errors: int = Field(
        default=5, ge=1, le=10_000, description="Canary errors in a row at which the gateway zeroes its weight."
    )


class SetWeight(Strict):
    setWeight: float = Field(ge=0, le=100, description="Percent of traffic to the canary.")


class Mirror(Strict):
    mirror: float = Field(ge=0, le=100, description="Percent of requests mirrored (shadow) to the canary.")


class HoldSpec(Strict):
    duration_s: float | None = Field(default=None, ge=0, description="Wait at least this long. Default 0.")
    min_requests: int | None = Field(default=None, ge=1, description="...and until the canary served this many.")

    @model_validator(mode="after")
    def duration_or_requests(self) -> HoldSpec:
        if self.duration_s is None and self.min_requests is None:
            raise ValueError("hold needs duration_s and/or min_requests")
        return self


class Hold(Strict):
    hold: HoldSpec


class AnalysisStep(Strict):
    analysis: dict[str, None] = Field(description="`analysis: {}`: wait for one passing window before going on.")


def _step_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        keys = [k for k in ("setWeight", "mirror", "hold", "analysis") if k in value]
        return keys[0] if len(keys) == 1 else None
    return next((k for k in ("setWeight", "mirror", "hold", "analysis") if hasattr(value, k)), None)


CanaryStep = Annotated[
    Annotated[SetWeight, Tag("setWeight")]
    | Annotated[Mirror, Tag("mirror")]
    | Annotated[Hold, Tag("hold")]
    | Annotated[AnalysisStep, Tag("analysis")],
    Discriminator(
        _step_tag,
        custom_error_type="canary_step",
        custom_error_message="a step sets exactly one of setWeight, mirror, hold or analysis",
    ),
]


@register_kind
class CanaryPlan(Document):
    """How a candidate is rolled out beside the champion, and when it is rolled back."""

    kind: Literal["CanaryPlan"] = "CanaryPlan"
    steps: list[CanaryStep] = Field(min_length=1, description="Ordered; each sets one thing.")
    analysis: Analysis = Field(description="Judges every window while the canary takes traffic.")
    breaker: Breaker = Field(default_factory=Breaker, description="In-gateway circuit breaker for the canary.")
    deadline_s: float = Field(default=1800, gt=0, description="The whole rollout must finish within. Default 30 min.")
    drain_timeout_s: float = Field(default=30, ge=0, description="Wait for in-flight canary requests. Default 30 s.")

    @model_validator(mode="after")
    def weights_never_decrease_and_some_traffic_is_analysed(self) -> CanaryPlan:
        weights = [s.setWeight for s in self.steps if isinstance(s, SetWeight)]
        if any(b < a for a, b in itertools.pairwise(weights)):
            raise ValueError(f"setWeight steps must not decrease ({weights}); rollback is automatic")
        if not weights and not any(isinstance(s, Mirror) and s.mirror > 0 for s in self.steps):
            raise ValueError("the plan never sends traffic to the canary (no setWeight or mirror > 0)")
        return self

    @property
    def worst_case_rollback_s(self) -> float:
        """Longest time from a fault's onset to the canary's weight 0, given at least ``min_requests`` canary
        requests per interval: the window judged just before the fault passes, then ``failure_limit``
        failing windows are needed, each judged one interval apart, plus one interval of detection lag."""
        return self.analysis.interval_s * (self.analysis.failure_limit + 1)
