"""The ``EvalSuite`` kind: a dataset, a prompt template, generation parameters and metrics."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from slipway.policies.kinds import Document, Strict, register_kind


class GenerationParams(Strict):
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Tokens to generate per example. Default 64.")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 is greedy (deterministic). Default 0.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass. Default 1.0.")
    batch_size: int = Field(default=16, ge=1, le=512, description="Examples generated together. Default 16.")
    stop: list[str] = Field(default_factory=list, description="Cut the output at the first of these. Default none.")
    seed: int = Field(default=0, description="Sampling seed (when temperature > 0). Default 0.")


class MetricSpec(Strict):
    name: str = Field(description="Metric name as it appears in results; a built-in name unless `uses` is set.")
    uses: str | None = Field(
        default=None, pattern=r"^python:[\w.]+:\w+$", description="Custom metric: python:package.module:function."
    )
    pattern: str | None = Field(default=None, description="regex_match: the regular expression to search for.")
    fields: list[str] | None = Field(default=None, description="json_field_match: fields compared (default all).")
    value: str | None = Field(default=None, description="contains: the text to look for (default the reference).")
    kinds: list[Literal["email", "phone", "card", "ssn"]] | None = Field(
        default=None, description="pii_leak: which PII patterns count (default all)."
    )
    binary: bool | None = Field(default=None, description="Custom metrics: scores are 0/1 (enables McNemar).")
    higher_is_better: bool | None = Field(default=None, description="Custom metrics: direction. Default true.")

    @model_validator(mode="after")
    def known_metric_with_its_parameters(self) -> MetricSpec:
        from slipway.metrics import BUILTIN

        if self.uses is None and self.name not in BUILTIN:
            raise ValueError(
                f"unknown metric {self.name!r}: built-ins are {', '.join(sorted(BUILTIN))}; "
                "or give `uses: python:package.module:function`"
            )
        if self.uses is None and self.name == "regex_match" and not self.pattern:
            raise ValueError("regex_match needs `pattern`")
        return self

    def params(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in {
                "pattern": self.pattern,
                "fields": self.fields,
                "value": self.value,
                "kinds": self.kinds,
            }.items()
            if v is not None
        }


@register_kind
class EvalSuite(Document):
    """What to evaluate a model on, and how to score it."""

    kind: Literal["EvalSuite"] = "EvalSuite"
    dataset: str = Field(
        description="JSONL examples: a dataset name (demo/eval is SLIPWAY_HOME/datasets/demo/eval.jsonl), a "
        ".jsonl path, or a file:// / s3:// URI."
    )
    prompt_template: str = Field(
        default="{prompt}", description="Python format string over an example's fields. Default '{prompt}'."
    )
    reference_field: str = Field(default="completion", description="Field holding the expected output.")
    id_field: str | None = Field(default="id", description="Field with a stable example id (default: line number).")
    limit: int | None = Field(default=None, ge=1, description="Evaluate only the first N examples. Default all.")
    generation: GenerationParams = Field(default_factory=GenerationParams, description="How outputs are generated.")
    metrics: list[MetricSpec] = Field(min_length=1, description="Metrics computed on every example.")

    @model_validator(mode="after")
    def metric_names_are_unique(self) -> EvalSuite:
        names = [m.name for m in self.metrics]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"metric names must be unique; repeated: {', '.join(dupes)}")
        return self
