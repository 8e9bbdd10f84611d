"""CanaryPlan's sequential analysis and judge fields: what loads, and each mistake reported at its file:line."""

from __future__ import annotations

import pytest

from slipway.policies.errors import PolicyError
from slipway.policies.loader import load_text

HEAD = """apiVersion: slipway/v1
kind: CanaryPlan
name: seq
steps:
  - mirror: 20
  - setWeight: 10
analysis:
  metrics:
"""


def _plan(metrics: str, sequential: str = "  sequential: {alpha: 0.05, max_samples: 500}\n"):
    return load_text(HEAD + metrics + sequential, "plan.yaml").get("CanaryPlan", "seq")


def test_a_plan_with_every_judge_kind_loads_with_its_defaults() -> None:
    plan = _plan(
        "    - {name: error_rate, thresholdRange: {max: 0.05}, min_difference: 0.02}\n"
        "    - {name: latency_p99, min_difference: 50}\n"
        "    - {name: quality, min_difference: 0.1, judge: {agreement: {method: similarity, threshold: 0.8}}}\n"
        "    - {name: quality, min_difference: 0.1, judge: {checks: {json_schema: {type: object}, pii: true}}}\n"
        "    - {name: quality, min_difference: 0.1, judge: {llm: {model: judge, rubric: 'more correct'}}}\n"
    )
    seq = plan.analysis.sequential
    assert (seq.alpha, seq.max_samples, seq.pair_share, seq.on_inconclusive) == (0.05, 500, 0.2, "rollback")
    assert [m.label for m in plan.analysis.sequential_metrics] == [
        "error_rate",
        "latency_p99",
        "quality.agreement",
        "quality.checks",
        "quality.llm",
    ]
    assert plan.analysis.metrics[4].judge.llm.position_swap is True


BAD = [
    pytest.param(
        "    - {name: error_rate, min_difference: 0.02}\n",
        "  sequential: {alpha: 0.6}\n",
        "plan.yaml:10:23: analysis.sequential.alpha: must be less than or equal to 0.5, got 0.6",
        id="alpha-above-half",
    ),
    pytest.param(
        "    - {name: error_rate, min_difference: 0.02}\n",
        "  sequential: {alpha: 0}\n",
        "plan.yaml:10:23: analysis.sequential.alpha: must be greater than 0, got 0",
        id="alpha-zero",
    ),
    pytest.param(
        "    - {name: error_rate, min_difference: 0.02}\n",
        "  sequential: {max_samples: 5}\n",
        "plan.yaml:10:29: analysis.sequential.max_samples: must be greater than or equal to 10, got 5",
        id="too-few-samples",
    ),
    pytest.param(
        "    - {name: error_rate, min_difference: 0.02}\n",
        "",
        "plan.yaml:8:3: analysis: error_rate: min_difference and judge need `sequential` (alpha, max_samples)",
        id="min-difference-without-sequential",
    ),
    pytest.param(
        "    - {name: error_rate, min_difference: 2}\n",
        "  sequential: {}\n",
        "plan.yaml:9:7: analysis.metrics[0]: min_difference of error_rate is a rate: below 1, not 2",
        id="rate-difference-above-one",
    ),
    pytest.param(
        "    - {name: quality, min_difference: 0.1, judge: {agreement: {}, checks: {valid_json: true}}}\n",
        "  sequential: {}\n",
        "plan.yaml:9:51: analysis.metrics[0].judge: a judge is exactly one of checks, agreement or llm "
        "(got checks, agreement)",
        id="two-judges",
    ),
    pytest.param(
        "    - {name: quality, min_difference: 0.1, judge: {checks: {json_schema: {type: 12}}}}\n",
        "  sequential: {}\n",
        "plan.yaml:9:74: analysis.metrics[0].judge.checks.json_schema: not a valid JSON Schema: 12 is not "
        "valid under any of the given schemas",
        id="bad-json-schema",
    ),
    pytest.param(
        "    - {name: quality, min_difference: 0.1, judge: {checks: {min_chars: 10, max_chars: 5}}}\n",
        "  sequential: {}\n",
        "plan.yaml:9:60: analysis.metrics[0].judge.checks: min_chars 10 is above max_chars 5",
        id="lengths-reversed",
    ),
    pytest.param(
        "    - {name: quality, judge: {agreement: {}}}\n",
        "  sequential: {}\n",
        "plan.yaml:9:7: analysis.metrics[0]: quality with a `judge` needs `min_difference` (it is judged sequentially)",
        id="judge-without-difference",
    ),
    pytest.param(
        "    - {name: quality, suite: s, metric: m, min_difference: 0.1}\n",
        "  sequential: {}\n",
        "plan.yaml:9:7: analysis.metrics[0]: min_difference on quality needs a `judge` (suite probes are judged by "
        "bounds)",
        id="probe-with-difference",
    ),
    pytest.param(
        "    - {name: ttft_p99, min_difference: 50}\n",
        "  sequential: {}\n",
        "plan.yaml:9:7: analysis.metrics[0]: ttft_p99 has no sequential test (mirrored requests are not streamed): "
        "use a bound",
        id="ttft-sequential",
    ),
    pytest.param(
        "    - {name: quality, min_difference: 0.1, judge: {agreement: {threshold: 1.5}}}\n",
        "  sequential: {}\n",
        "plan.yaml:9:75: analysis.metrics[0].judge.agreement.threshold: must be less than or equal to 1, got 1.5",
        id="threshold-above-one",
    ),
    pytest.param(
        "    - {name: quality, min_difference: 0.1, judge: {llm: {model: j, rubric: r}}}\n"
        "    - {name: quality, min_difference: 0.2, judge: {llm: {model: k, rubric: r}}}\n",
        "  sequential: {}\n",
        "plan.yaml:8:3: analysis: one metric per judge kind: quality.llm declared twice",
        id="judge-kind-twice",
    ),
]


@pytest.mark.parametrize(("metrics", "sequential", "expected"), BAD)
def test_a_malformed_sequential_field_is_reported_at_its_line(metrics: str, sequential: str, expected: str) -> None:
    with pytest.raises(PolicyError) as e:
        _plan(metrics, sequential)
    assert e.value.lines()[0] == expected
