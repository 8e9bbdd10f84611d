"""The ``CanaryPlan`` kind: ordered steps that each set one thing, and the analysis that judges each window.

Shaped after Argo Rollouts (``- setWeight: 10``, ``- pause``) and Flagger's metric checks
(``{name, thresholdRange: {min|max}}``), with bounds relative to the champion measured in the same window.
With ``analysis.sequential`` each metric that declares a ``min_difference`` is also judged by an always-valid
sequential test (:mod:`slipway.sequential`) on the candidate's difference from the champion, with the stated
error rate ``alpha``; ``quality`` metrics may be scored on pairs of live answers by a declared ``judge``.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

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


class ChecksJudge(Strict):
    """Reference-free checks of each answer on its own: a pair scores 1 for an answer that passes them all, else 0,
    for the candidate and for the champion alike."""

    valid_json: bool = Field(default=False, description="The answer must parse as JSON. Default false.")
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="The answer must be JSON matching this JSON Schema (implies valid_json). Default none.",
    )
    refusal: bool = Field(
        default=False, description='An answer that refuses ("I can\'t help with that" ...) fails. Default false.'
    )
    min_chars: int | None = Field(default=None, ge=0, description="Shortest answer that passes, in characters.")
    max_chars: int | None = Field(default=None, ge=1, description="Longest answer that passes, in characters.")
    pii: bool = Field(
        default=False, description="An answer holding an e-mail, phone, card or SSN-like number fails. Default false."
    )

    @field_validator("json_schema")
    @classmethod
    def schema_is_a_json_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(v)
            except jsonschema.SchemaError as e:
                raise ValueError(f"not a valid JSON Schema: {e.message}") from None
        return v

    @model_validator(mode="after")
    def checks_something_and_lengths_are_ordered(self) -> ChecksJudge:
        if not (self.valid_json or self.json_schema or self.refusal or self.pii) and (
            self.min_chars is None and self.max_chars is None
        ):
            raise ValueError("checks needs at least one of valid_json, json_schema, refusal, min_chars, max_chars, pii")
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} is above max_chars {self.max_chars}")
        return self


class AgreementJudge(Strict):
    """Agreement with the champion's answer to the same request, the champion taken as right: a pair's difference
    is 1 where the candidate disagrees. For candidates meant to answer as the champion does (a new engine,
    quantisation, hardware, a distilled copy) under greedy decoding."""

    method: Literal["exact", "normalized", "similarity"] = Field(
        default="normalized",
        description="exact: same text; normalized: same after case-folding, collapsing whitespace and dropping "
        "punctuation; similarity: difflib's ratio of the normalised texts at least `threshold`. Default normalized.",
    )
    threshold: float = Field(
        default=0.9, gt=0, le=1, description="similarity: the ratio (0-1] counted as agreeing. Default 0.9."
    )


class LlmJudge(Strict):
    """A model the gateway serves compares the two answers of each pair under a rubric (pairwise, like
    MT-Bench's judge). With ``position_swap`` it is asked twice, the answers in both orders, and a win counts only
    when both orders agree (a tie otherwise), which removes the judge's bias for a position."""

    model: str = Field(min_length=1, description="A model served by the gateway (its production version judges).")
    rubric: str = Field(min_length=1, description="What makes an answer better, in words the judge model reads.")
    position_swap: bool = Field(
        default=True, description="Ask in both orders; count only consistent wins. Default true."
    )
    max_tokens: int = Field(default=8, ge=1, le=512, description="Tokens of the judge's verdict. Default 8.")


class JudgeSpec(Strict):
    """How each pair of live answers is scored: exactly one of ``checks``, ``agreement`` or ``llm``."""

    checks: ChecksJudge | None = Field(default=None, description="Reference-free checks of each answer.")
    agreement: AgreementJudge | None = Field(default=None, description="Agreement with the champion's answer.")
    llm: LlmJudge | None = Field(default=None, description="A judge model with a rubric, position-swapped.")
    sample: float = Field(
        default=1.0, gt=0, le=1, description="Share (0-1] of the pairs this judge scores. Default 1 (all)."
    )

    @model_validator(mode="after")
    def exactly_one_judge(self) -> JudgeSpec:
        chosen = [k for k in ("checks", "agreement", "llm") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"a judge is exactly one of checks, agreement or llm (got {', '.join(chosen) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("checks", "agreement", "llm") if getattr(self, k) is not None)


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
    judge: JudgeSpec | None = Field(
        default=None,
        description="quality: score pairs of live answers (the same request answered by both versions) with this "
        "judge instead of probing a suite. Needs analysis.sequential. Default none.",
    )
    min_difference: float | None = Field(
        default=None,
        gt=0,
        description="Sequential analysis: the smallest regression (candidate minus champion, in the metric's unit: "
        "a rate for error_rate and quality, ms for latency and TTFT) that matters. The candidate is rolled back once "
        "it is shown worse at all, promoted once shown worse by less than this. Needs analysis.sequential. "
        "Default none (fixed bounds only).",
    )

    @model_validator(mode="after")
    def has_a_bound_and_quality_has_its_source(self) -> AnalysisMetric:
        if self.name == "quality":
            if self.judge is None and (self.suite is None or self.metric is None):
                raise ValueError("quality needs `suite` and `metric` (probes) or `judge` (live pairs)")
            if self.judge is not None and self.suite is not None:
                raise ValueError("quality takes `suite` (probes) or `judge` (live pairs), not both")
            if self.judge is not None and self.min_difference is None:
                raise ValueError("quality with a `judge` needs `min_difference` (it is judged sequentially)")
            if self.judge is None and self.min_difference is not None:
                raise ValueError("min_difference on quality needs a `judge` (suite probes are judged by bounds)")
        elif self.judge is not None or self.suite is not None:
            raise ValueError(f"`judge` and `suite` belong to quality metrics, not {self.name}")
        if self.thresholdRange is None and self.relative is None and self.min_difference is None:
            raise ValueError(f"metric {self.name} needs thresholdRange, relative and/or min_difference")
        if self.min_difference is not None and self.name.startswith("ttft_"):
            raise ValueError(f"{self.name} has no sequential test (mirrored requests are not streamed): use a bound")
        if self.min_difference is not None and self.name in ("error_rate", "quality") and self.min_difference >= 1:
            raise ValueError(f"min_difference of {self.name} is a rate: below 1, not {self.min_difference:g}")
        return self

    @property
    def label(self) -> str:
        """The metric's name in verdicts and explanations: ``quality.<judge>`` for a judged quality metric."""
        return f"quality.{self.judge.kind}" if self.judge is not None else self.name


class SequentialSpec(Strict):
    """Always-valid sequential analysis (a normal-mixture confidence sequence, looked at every interval): each
    metric with a ``min_difference`` stops as soon as its evidence decides, with the stated error rates."""

    alpha: float = Field(
        default=0.05,
        gt=0,
        le=0.5,
        description="Chance of rolling back a candidate as good as the champion (and of promoting one worse by "
        "min_difference), however often it is looked at. Default 0.05; (0, 0.5].",
    )
    max_samples: int = Field(
        default=2000,
        ge=10,
        le=10_000_000,
        description="Per metric, samples (pairs, or request pairs for error_rate) after which its look is "
        "inconclusive. Default 2000; 10-10,000,000.",
    )
    pair_share: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="During weighted steps, share (0-1] of each version's live requests the other version also "
        "answers (the shadow path) to form pairs; during mirror steps the mirror share is used. Default 0.2.",
    )
    on_inconclusive: Literal["rollback", "promote"] = Field(
        default="rollback", description="What an inconclusive metric (max_samples reached) does. Default rollback."
    )
    promote_early: bool = Field(
        default=True,
        description="Complete the rollout (skip the remaining steps) as soon as every sequential metric shows "
        "non-inferiority. Default true.",
    )


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
    sequential: SequentialSpec | None = Field(
        default=None,
        description="Judge metrics with a min_difference by a sequential test with stated error rates, besides "
        "their fixed bounds (which stay as guards). Default none.",
    )

    @model_validator(mode="after")
    def sequential_metrics_have_a_test(self) -> Analysis:
        wanting = [m.label for m in self.metrics if m.min_difference is not None or m.judge is not None]
        if wanting and self.sequential is None:
            raise ValueError(f"{', '.join(wanting)}: min_difference and judge need `sequential` (alpha, max_samples)")
        labels = [m.label for m in self.metrics]
        twice = sorted({x for x in labels if labels.count(x) > 1 and x.startswith("quality.")})
        if twice:
            raise ValueError(f"one metric per judge kind: {', '.join(twice)} declared twice")
        if self.sequential is not None and not any(m.min_difference is not None for m in self.metrics):
            raise ValueError("`sequential` needs at least one metric with a min_difference")
        return self

    @property
    def sequential_metrics(self) -> list[AnalysisMetric]:
        """The metrics a sequential test judges (those with a ``min_difference``)."""
        return [m for m in self.metrics if m.min_difference is not None]


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
