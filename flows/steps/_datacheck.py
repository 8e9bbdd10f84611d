"""Run a :class:`~slipway.policies.datasuite.DataSuite` against rows with Great Expectations (Core 1.x).

The suite is translated expectation by expectation into a GX ``ExpectationSuite``; rows become a pandas
batch of an ephemeral context; a ``ValidationDefinition`` runs it. The report keeps, per expectation, its
success, the unexpected count and share, and a few examples — with the offending match of a ``notMatch``
check masked, so a PII finding does not copy the PII into the registry.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slipway.policies.datasuite import DataSuite

_EXAMPLES = 3
_EXAMPLE_CHARS = 120


@dataclass(frozen=True)
class CheckResult:
    name: str  # e.g. "notMatch(prompt, email)"
    expectation: str  # the GX expectation type
    success: bool
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    observed: Any = None
    examples: list[Any] = field(default_factory=list)
    error: str | None = None

    def describe(self) -> str:
        if self.error:
            return f"{self.name}: error: {self.error}"
        parts = [self.name]
        if self.unexpected_count is not None:
            pct = f" ({self.unexpected_percent:.1f}%)" if self.unexpected_percent is not None else ""
            parts.append(f": {self.unexpected_count} unexpected{pct}")
        elif self.observed is not None:
            parts.append(f": observed {self.observed}")
        if self.examples:
            parts.append(f", e.g. {self.examples[0]!r}")
        return "".join(parts)


@dataclass(frozen=True)
class ValidationReport:
    suite: str
    rows: int
    success: bool
    checks: list[CheckResult]

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "rows": self.rows,
            "success": self.success,
            "engine": "great_expectations",
            "checks": [asdict(c) for c in self.checks],
        }

    def summary(self) -> str:
        if self.success:
            return f"all {len(self.checks)} expectations of DataSuite {self.suite!r} passed on {self.rows} rows"
        failed = self.failed
        head = (
            f"{len(failed)} of {len(self.checks)} expectations of DataSuite {self.suite!r} failed on {self.rows} rows"
        )
        return head + ": " + "; ".join(c.describe() for c in failed)


def _translate(suite: DataSuite) -> list[tuple[str, Any, re.Pattern[str] | None]]:
    """``(name, GX expectation, mask)`` for every check the suite declares."""
    import great_expectations as gx

    E = gx.expectations
    out: list[tuple[str, Any, re.Pattern[str] | None]] = []
    for col in suite.columns:
        out.append((f"column({col})", E.ExpectColumnToExist(column=col), None))
    if suite.rows is not None:
        r = suite.rows
        out.append(
            (f"rows[{r.min}, {r.max}]", E.ExpectTableRowCountToBeBetween(min_value=r.min, max_value=r.max), None)
        )
    for item in suite.expectations:
        key = next(iter(type(item).model_fields))
        spec = getattr(item, key)
        label = f", {spec.label}" if spec.label else ""
        mostly = {"mostly": spec.mostly} if spec.mostly < 1 else {}
        if key == "notNull":
            exp = E.ExpectColumnValuesToNotBeNull(column=spec.column, **mostly)
            name = f"notNull({spec.column}{label})"
        elif key == "unique":
            exp = E.ExpectColumnValuesToBeUnique(column=spec.column, **mostly)
            name = f"unique({spec.column}{label})"
        elif key == "length":
            exp = E.ExpectColumnValueLengthsToBeBetween(
                column=spec.column, min_value=spec.min, max_value=spec.max, **mostly
            )
            name = f"length({spec.column}, {spec.min}..{spec.max}{label})"
        elif key == "match":
            exp = E.ExpectColumnValuesToMatchRegex(column=spec.column, regex=spec.regex, **mostly)
            name = f"match({spec.column}{label or ', ' + spec.regex})"
        else:
            exp = E.ExpectColumnValuesToNotMatchRegex(column=spec.column, regex=spec.regex, **mostly)
            name = f"notMatch({spec.column}{label or ', ' + spec.regex})"
            out.append((name, exp, re.compile(spec.regex)))
            continue
        out.append((name, exp, None))
    return out


def _example(value: Any, mask: re.Pattern[str] | None, label: str) -> Any:
    if isinstance(value, str):
        if mask is not None:
            value = mask.sub(f"<{label}>", value)
        if len(value) > _EXAMPLE_CHARS:
            value = value[: _EXAMPLE_CHARS - 1] + "…"
    return value


def _present(values: list[Any] | None) -> list[Any]:
    """Unexpected values worth showing: a null (None or NaN) says nothing the count does not."""
    return [v for v in values or [] if v is not None and v == v]


def validate_rows(suite: DataSuite, rows: list[dict[str, Any]]) -> ValidationReport:
    """Validate ``rows`` against ``suite`` with Great Expectations; never raises for failing data."""
    import logging

    import great_expectations as gx
    import pandas as pd

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    df = pd.DataFrame.from_records(rows)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no bars inside a pipeline's output
    tag = uuid.uuid4().hex[:8]
    source = context.data_sources.add_pandas(name=f"slipway-{tag}")
    asset = source.add_dataframe_asset(name="rows")
    batch_def = asset.add_batch_definition_whole_dataframe("all")
    translated = _translate(suite)
    gx_suite = context.suites.add(gx.ExpectationSuite(name=f"{suite.name}-{tag}"))
    for _name, exp, _mask in translated:
        gx_suite.add_expectation(exp)
    vd = context.validation_definitions.add(gx.ValidationDefinition(name=f"v-{tag}", data=batch_def, suite=gx_suite))
    result = vd.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")
    # GX returns results in suite order; match them back to our names by expectation id.
    by_id = {exp.id: (name, mask) for name, exp, mask in translated}
    checks = []
    for r in result.results:
        name, mask = by_id.get(r.expectation_config.id, (r.expectation_config.type, None))
        res = r.result or {}
        label = name.split(", ")[-1].rstrip(")") if mask is not None else ""
        error = None
        if r.exception_info and r.exception_info.get("raised_exception"):
            error = str(r.exception_info.get("exception_message", "")).splitlines()[0][:200]
        checks.append(
            CheckResult(
                name=name,
                expectation=r.expectation_config.type,
                success=bool(r.success),
                unexpected_count=res.get("unexpected_count"),
                unexpected_percent=res.get("unexpected_percent"),
                observed=res.get("observed_value"),
                examples=[_example(v, mask, label) for v in _present(res.get("partial_unexpected_list"))[:_EXAMPLES]],
                error=error,
            )
        )
    return ValidationReport(suite=suite.name, rows=len(df), success=all(c.success for c in checks), checks=checks)
