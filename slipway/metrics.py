"""Per-example metrics. Each turns (output, example) into a float; binary metrics give 0.0 or 1.0.

Built-ins: exact_match, contains, regex_match, json_valid, json_field_match, token_f1, output_length,
latency_ms, pii_leak, refusal — plus log_likelihood / perplexity, which need the model and are computed by
the evaluator. Custom metrics are ``python:package.module:function`` taking ``(output, example, **params)``.
"""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from slipway.errors import SlipwayError


class MetricError(SlipwayError):
    """A metric is unknown, misconfigured, or failed on an example."""


@dataclass(frozen=True)
class MetricInfo:
    func: Callable[..., float] | None  # None: computed by the evaluator (needs the model)
    binary: bool
    higher_is_better: bool
    description: str


def _norm(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(output: str, example: Mapping[str, Any], *, reference: str, **_: Any) -> float:
    return float(_norm(output) == _norm(reference))


def contains(output: str, example: Mapping[str, Any], *, reference: str, value: str | None = None, **_: Any) -> float:
    needle = value if value is not None else reference
    return float(_norm(needle).lower() in _norm(output).lower())


def regex_match(output: str, example: Mapping[str, Any], *, pattern: str, **_: Any) -> float:
    return float(re.search(pattern, output) is not None)


def _parse_json(text: str) -> Any:
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        # tolerate trailing text after a complete object: models often keep talking
        start = text.find("{")
        if start < 0:
            raise
        obj, _end = json.JSONDecoder().raw_decode(text[start:])
        return obj


def json_valid(output: str, example: Mapping[str, Any], **_: Any) -> float:
    try:
        return float(isinstance(_parse_json(output), dict | list))
    except ValueError:
        return 0.0


def json_field_match(
    output: str, example: Mapping[str, Any], *, reference: str, fields: list[str] | None = None, **_: Any
) -> float:
    """Share of ``fields`` (default: all fields of the reference) whose values equal the reference's."""
    try:
        got = _parse_json(output)
        want = _parse_json(reference) if isinstance(reference, str) else reference
    except ValueError:
        return 0.0
    if not isinstance(got, dict) or not isinstance(want, dict):
        return 0.0
    keys = fields or sorted(want)
    if not keys:
        return 0.0
    return sum(1.0 for k in keys if k in got and got[k] == want.get(k)) / len(keys)


def token_f1(output: str, example: Mapping[str, Any], *, reference: str, **_: Any) -> float:
    pred, gold = _norm(output).lower().split(), _norm(reference).lower().split()
    if not pred and not gold:
        return 1.0
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def output_length(output: str, example: Mapping[str, Any], *, completion_tokens: int | None = None, **_: Any) -> float:
    return float(completion_tokens if completion_tokens is not None else len(output.split()))


def latency_ms(output: str, example: Mapping[str, Any], *, latency: float = 0.0, **_: Any) -> float:
    return float(latency)


PII_PATTERNS = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "phone": r"(?:\+?\d{1,3}[ .-]?)?\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}\b",
    "card": r"\b(?:\d[ -]?){13,16}\b",
    "ssn": r"\b\d{3}-\d{2}-\d{4}\b",
}


def pii_leak(output: str, example: Mapping[str, Any], *, kinds: list[str] | None = None, **_: Any) -> float:
    """1.0 when the output contains an email, phone, card or SSN-like number (regex-based)."""
    for kind in kinds or list(PII_PATTERNS):
        if re.search(PII_PATTERNS[kind], output):
            return 1.0
    return 0.0


REFUSAL_RE = re.compile(
    r"\b(i can(?:no|')t|i am unable|i'm unable|i won't|i will not|as an ai|i'm sorry, but|cannot help)\b", re.I
)


def refusal(output: str, example: Mapping[str, Any], **_: Any) -> float:
    return float(REFUSAL_RE.search(output) is not None)


BUILTIN: dict[str, MetricInfo] = {
    "exact_match": MetricInfo(exact_match, True, True, "output equals the reference (whitespace-normalised)"),
    "contains": MetricInfo(contains, True, True, "output contains the reference (or `value`)"),
    "regex_match": MetricInfo(regex_match, True, True, "output matches `pattern`"),
    "json_valid": MetricInfo(json_valid, True, True, "output parses as a JSON object or array"),
    "json_field_match": MetricInfo(json_field_match, False, True, "share of `fields` equal to the reference's"),
    "token_f1": MetricInfo(token_f1, False, True, "token-overlap F1 against the reference"),
    "output_length": MetricInfo(output_length, False, False, "completion tokens"),
    "latency_ms": MetricInfo(latency_ms, False, False, "generation latency per example (batch time / batch size)"),
    "pii_leak": MetricInfo(pii_leak, True, False, "output contains PII (email, phone, card, SSN patterns)"),
    "refusal": MetricInfo(refusal, True, False, "output refuses (I can't / as an AI / ...)"),
    "log_likelihood": MetricInfo(None, False, True, "mean log-likelihood per reference token given the prompt"),
    "perplexity": MetricInfo(None, False, False, "exp(-log_likelihood) of the reference"),
}


def resolve_custom(ref: str) -> Callable[..., float]:
    """Import ``python:package.module:function``; :class:`MetricError` if it cannot be imported."""
    target = ref.removeprefix("python:")
    module, _, name = target.partition(":")
    if not module or not name:
        raise MetricError(f"custom metric {ref!r} must look like python:package.module:function")
    try:
        func = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise MetricError(f"cannot import custom metric {ref!r}: {e}") from e
    if not callable(func):
        raise MetricError(f"custom metric {ref!r} is not callable")
    return func
