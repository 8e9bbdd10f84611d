"""The compiler and the CLI commands that need no run: plan by levels, params, expressions, schema export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slipway.flows.compiler import ParamError, compile_pipeline, load_plan, resolve_params
from slipway.flows.graph import render
from slipway.policies import expressions as ex
from slipway.policies.errors import PolicyError
from slipway.policies.loader import load_text

REPO = Path(__file__).resolve().parents[2]

DIAMOND = """\
apiVersion: slipway/v1
kind: Pipeline
name: diamond
params:
  n: {type: integer, default: 1}
  tag: {type: string}
steps:
  top: {uses: echo}
  left: {uses: echo, needs: top}
  right: {uses: echo, needs: [top], retries: 2, timeout: 60}
  bottom: {uses: notify, needs: [left, right], if: failure(), with: {message: "${{ params.tag }}"}}
"""


def _plan(text: str = DIAMOND):
    docs = load_text(text, "d.yaml")
    return compile_pipeline(docs.items[0].doc, docs)


def test_plan_orders_steps_by_levels_with_transitive_upstream() -> None:
    plan = _plan()
    assert plan.levels == (("top",), ("left", "right"), ("bottom",))
    assert plan.steps["bottom"].upstream == {"top", "left", "right"}
    assert plan.downstream("left") == {"bottom"}
    assert plan.steps["right"].spec.retries == 2


def test_plan_renders_as_text_mermaid_and_dot() -> None:
    plan = _plan()
    assert render(plan, "text") == (
        "pipeline diamond — 4 steps\n"
        "params: n: integer = 1, tag: string\n"
        "level 0:\n  top (echo)\n"
        "level 1:\n  left (echo)  [needs top]\n  right (echo)  [needs top; retries 2; timeout 60s]\n"
        "level 2:\n  bottom (notify)  [needs left, right; if failure()]\n"
    )
    mermaid = render(plan, "mermaid")
    assert mermaid.startswith("flowchart TD\n") and "  s1 -->|if| s3\n" in mermaid
    dot = render(plan, "dot")
    assert '"top" -> "left";' in dot and '"right" -> "bottom" [style=dashed, label="if"];' in dot


def test_params_are_typed_defaulted_and_checked_all_at_once() -> None:
    p = _plan().pipeline
    assert resolve_params(p, {"n": "3", "tag": "v1"}) == {"n": 3, "tag": "v1"}
    assert resolve_params(p, {"tag": "007"}) == {"n": 1, "tag": "007"}  # a string param stays text
    with pytest.raises(ParamError) as e:
        resolve_params(p, {"n": "many", "tga": "x"})
    assert str(e.value) == (
        "unknown param 'tga' for pipeline 'diamond' (did you mean 'tag'?); param 'n': must be a valid integer, "
        "unable to parse string as an integer, got 'many'; param 'tag' is required (string)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("params.n", 2),
        ("params.n >= 2 && !params.off", True),
        ("steps.a.outputs.v.x == 'y'", True),
        ("steps.a.outputs.list.1 == 20", True),
        ("success()", False),
        ("failure() || params.off", True),
        ("always()", True),
        ("(params.n < 1) || 'a' != \"a\"", False),
        ("null == null", True),
    ],
)
def test_conditions_evaluate(text: str, expected: object) -> None:
    scope = ex.Scope(
        params={"n": 2, "off": False},
        outputs={"a": {"v": {"x": "y"}, "list": [10, 20]}},
        upstream_status={"a": "succeeded", "b": "failed"},
    )
    assert ex.evaluate(ex.parse_condition(text), scope) == expected


def test_templates_keep_types_when_whole_and_become_text_when_embedded() -> None:
    scope = ex.Scope(params={"n": 3, "ok": True}, outputs={}, upstream_status={})
    assert ex.render(
        {"a": "${{ params.n }}", "b": " ${{ params.n }} ", "c": ["n=${{ params.n }}/${{ params.ok }}"]}, scope
    ) == {
        "a": 3,
        "b": 3,
        "c": ["n=3/true"],
    }


@pytest.mark.parametrize(
    ("text", "message", "offset"),
    [
        ("params.", "expression ends early: expected a value", 7),
        ("params.x ==", "expression ends early: expected a value", 11),
        ("steps.a.out.x", "'steps.a.out.x' is not a step output: write steps.STEP.outputs.NAME", 0),
        ("env.HOME", "unknown name 'env': expressions read params.NAME or steps.STEP.outputs.NAME", 0),
        ("params.x ; 1", "unexpected character ';'", 9),
    ],
)
def test_malformed_expressions_say_what_and_where(text: str, message: str, offset: int) -> None:
    with pytest.raises(ex.ExpressionError) as e:
        ex.parse(text)
    assert (str(e.value), e.value.offset) == (message, offset)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / ".venv/bin/slipway"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_validate_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "bad.yaml").write_text(
        "apiVersion: slipway/v1\nkind: Pipeline\nname: bad\nsteps:\n  a: {uses: echoo}\n  b: {uses: echo, needs: [c]}\n"
    )
    r = _cli("validate", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout.splitlines() == [
        "policies/bad.yaml:5:13: steps.a.uses: unknown step type 'echoo' (did you mean 'echo'?)",
        "policies/bad.yaml:6:27: steps.b.needs[0]: unknown step 'c'",
    ]
    assert r.stderr == "2 errors in 1 file\n"


def test_validate_accepts_the_shipped_policies() -> None:
    r = _cli("validate", cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok: ") and "Pipeline" in r.stdout


def test_plan_names_a_shipped_pipeline_and_run_refuses_a_bad_param_with_exit_2() -> None:
    r = _cli("plan", "hello", cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "pipeline hello — 4 steps"
    r = _cli("run", "hello", "--param", "whom=x", cwd=REPO)
    assert r.returncode == 2
    assert r.stderr == "slipway: error: unknown param 'whom' for pipeline 'hello' (did you mean 'who'?)\n"


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\nfrom slipway.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('prefect', 'torch', 'ray', 'great_expectations') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_schema_export_writes_a_json_schema_per_kind(tmp_path: Path) -> None:
    r = _cli("schema", "--out", str(tmp_path / "schema"), "--markdown", str(tmp_path / "policies.md"), cwd=REPO)
    assert r.returncode == 0, r.stderr
    pipeline = json.loads((tmp_path / "schema" / "Pipeline.schema.json").read_text())
    step = pipeline["$defs"]["Step"]
    assert {"uses", "needs", "with", "if", "retries", "timeout"} <= set(step["properties"])
    assert step["additionalProperties"] is False
    assert "## Pipeline" in (tmp_path / "policies.md").read_text()


def test_checked_in_policy_reference_is_up_to_date() -> None:
    from slipway.flows import reference

    assert (REPO / "docs/reference/policies.md").read_text() == reference.markdown(), (
        "regenerate with: slipway schema --markdown docs/reference/policies.md"
    )


def test_load_plan_reports_an_unknown_pipeline_name(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as e:
        load_plan("helo", policies=str(REPO / "policies"))
    assert str(e.value) == "no file 'helo' and no Pipeline named 'helo' (did you mean 'hello'?)"
