# ruff: noqa: E501 - the table holds exact one-line messages
"""The policy loader: every malformed document gives exact ``FILE:LINE:COL: path: message`` lines, all at once,
and no input whatsoever makes it raise anything but ``PolicyError``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slipway.flows.steptypes import STEP_TYPES, StepContext, step_type
from slipway.policies.errors import PolicyError
from slipway.policies.kinds import KINDS, DocRef, Document, Strict, register_kind
from slipway.policies.loader import collect, load, load_text

HEAD = "apiVersion: slipway/v1\nkind: Pipeline\nname: p\n"


class TargetDoc(Document):
    """A test kind that other documents reference."""

    kind: Literal["TestTarget"] = "TestTarget"


class RefDoc(Document):
    """A test kind with a reference to a TestTarget."""

    kind: Literal["TestRef"] = "TestRef"
    target: Annotated[str, DocRef("TestTarget")]


class RefInput(Strict):
    target: Annotated[str, DocRef("TestTarget")]


class RefOutput(Strict):
    ok: bool


def _ref_step(ctx: StepContext, inp: RefInput) -> RefOutput:
    return RefOutput(ok=True)


@pytest.fixture
def test_kinds() -> Iterator[None]:
    """Kinds and a step type with references, registered for one test only."""
    from slipway.flows.steptypes import discover
    from slipway.policies.discovery import load_kinds

    load_kinds()
    discover()
    register_kind(TargetDoc)
    register_kind(RefDoc)
    step_type("test_ref")(_ref_step)
    yield
    KINDS.pop("TestTarget")
    KINDS.pop("TestRef")
    STEP_TYPES.pop("test_ref")


MALFORMED = [
    pytest.param(
        HEAD + "steps: {a: {uses: echo}\n",
        "p.yaml:5:1: invalid YAML: while parsing a flow mapping, expected ',' or '}', but got '<stream end>'",
        id="syntax-unclosed-flow",
    ),
    pytest.param(
        HEAD + "  extra: x\n",
        "p.yaml:4:8: invalid YAML: mapping values are not allowed here",
        id="syntax-mapping-in-scalar",
    ),
    pytest.param(
        HEAD + "steps:\n\ta: {uses: echo}\n",
        "p.yaml:5:1: invalid YAML: while scanning for the next token, found character '\\t' that cannot start any token",
        id="syntax-tab-indent",
    ),
    pytest.param(
        HEAD + "name: q\nsteps: {a: {uses: echo}}\n",
        "p.yaml:4:1: name: duplicate key 'name' (first defined at line 3)",
        id="duplicate-key",
    ),
    pytest.param(
        "- apiVersion: slipway/v1\n",
        "p.yaml:1:1: a document must be a mapping with apiVersion, kind and name, not a list",
        id="not-a-mapping",
    ),
    pytest.param(
        "apiVersion: slipway/v1\nname: p\n",
        "p.yaml:1:1: missing required key 'kind'",
        id="missing-kind",
    ),
    pytest.param(
        "apiVersion: slipway/v1\nkind: Pipline\nname: p\n",
        "p.yaml:2:7: kind: unknown kind 'Pipline' (did you mean 'Pipeline'?)",
        id="unknown-kind",
    ),
    pytest.param(
        "apiVersion: slipway/v2\nkind: Pipeline\nname: p\nsteps: {a: {uses: echo}}\n",
        "p.yaml:1:13: apiVersion: must be 'slipway/v1', got 'slipway/v2'",
        id="wrong-api-version",
    ),
    pytest.param(
        "apiVersion: slipway/v1\nkind: Pipeline\nsteps: {a: {uses: echo}}\n",
        "p.yaml:1:1: missing required key 'name'",
        id="missing-name",
    ),
    pytest.param(
        "apiVersion: slipway/v1\nkind: Pipeline\nname: Bad Name\nsteps: {a: {uses: echo}}\n",
        "p.yaml:3:7: name: invalid value 'Bad Name': names use lowercase letters, digits, '.', '_' or '-', start with a letter or digit (max 128)",
        id="invalid-name",
    ),
    pytest.param(
        HEAD + "stpes: {a: {uses: echo}}\nsteps: {a: {uses: echo}}\n",
        "p.yaml:4:1: unknown key 'stpes' (did you mean 'steps'?)",
        id="unknown-top-key",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: echo}\n  b:\n    uses: echo\n    need: [a]\n",
        "p.yaml:8:5: steps.b: unknown key 'need' (did you mean 'needs'?)",
        id="unknown-step-key",
    ),
    pytest.param(
        HEAD + "steps:\n  a:\n    uses: echo\n    retries: three\n",
        "p.yaml:7:14: steps.a.retries: must be a valid integer, unable to parse string as an integer, got 'three'",
        id="wrong-type",
    ),
    pytest.param(
        HEAD + "steps:\n  a:\n    uses: echo\n    retries: 50\n",
        "p.yaml:7:14: steps.a.retries: must be less than or equal to 20, got 50",
        id="out-of-bounds",
    ),
    pytest.param(
        HEAD + "steps: {}\n",
        "p.yaml:4:8: steps: must have at least 1 item, got 0",
        id="no-steps",
    ),
    pytest.param(
        HEAD + "steps:\n  - uses: echo\n",
        "p.yaml:5:3: steps: must be a valid mapping, got a list",
        id="steps-not-mapping",
    ),
    pytest.param(
        HEAD + "steps:\n  a:\n    with: {}\n",
        "p.yaml:6:5: steps.a: missing required key 'uses'",
        id="missing-uses",
    ),
    pytest.param(
        HEAD + "steps:\n  Build Step: {uses: echo}\n",
        "p.yaml:5:3: steps.Build Step: invalid name 'Build Step': step names use lowercase letters, digits, '_' or '-', start with a letter or digit (max 63)",
        id="invalid-step-name",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: echo}\n  a: {uses: notify}\n",
        "p.yaml:6:3: steps.a: duplicate key 'a' (first defined at line 5)",
        id="duplicate-step",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: echoo}\n",
        "p.yaml:5:13: steps.a.uses: unknown step type 'echoo' (did you mean 'echo'?)",
        id="unknown-step-type",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: 'python:nomodule'}\n",
        "p.yaml:5:13: steps.a.uses: invalid value 'python:nomodule': expected a step type name (e.g. notify) or python:package.module:function",
        id="malformed-uses",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: 'python:no_such_module_x:run'}\n",
        "p.yaml:5:13: steps.a.uses: cannot import 'no_such_module_x': ModuleNotFoundError: No module named 'no_such_module_x'",
        id="python-module-missing",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: 'python:tests.pipeline_steps:slep'}\n",
        "p.yaml:5:13: steps.a.uses: module 'tests.pipeline_steps' has no function 'slep' (did you mean 'sleep'?)",
        id="python-function-missing",
    ),
    pytest.param(
        HEAD + "steps:\n  build: {uses: echo}\n  test: {uses: echo, needs: [bild]}\n",
        "p.yaml:6:30: steps.test.needs[0]: unknown step 'bild' (did you mean 'build'?)",
        id="dangling-needs",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: echo, needs: [c]}\n  b: {uses: echo, needs: [a]}\n  c: {uses: echo, needs: [b]}\n",
        "p.yaml:5:27: steps.a.needs[0]: needs form a cycle: a -> c -> b -> a",
        id="cyclic-needs",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: echo, needs: a}\n",
        "p.yaml:5:26: steps.a.needs[0]: step 'a' cannot need itself",
        id="self-needs",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: echo}\n  b: {uses: notify, needs: a, with: {message: '${{ steps.a.values }}'}}\n",
        "p.yaml:6:47: steps.b.with.message: bad expression: 'steps.a.values' is not a step output: write steps.STEP.outputs.NAME",
        id="bad-expression-shape",
    ),
    pytest.param(
        HEAD + "params: {x: {default: 1}}\nsteps:\n  a: {uses: notify, with: {message: '${{ params.x == }}'}}\n",
        "p.yaml:6:37: steps.a.with.message: bad expression: expression ends early: expected a value",
        id="bad-expression-syntax",
    ),
    pytest.param(
        HEAD + "params: {x: {default: 1}}\nsteps:\n  a: {uses: notify, with: {message: 'v=${{ params.x'}}\n",
        "p.yaml:6:37: steps.a.with.message: bad expression: '${{' is not closed with '}}'",
        id="unclosed-expression",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: echo}\n  b: {uses: notify, with: {message: '${{ steps.a.outputs.values }}'}}\n",
        "p.yaml:6:37: steps.b.with.message: step 'a' is not upstream of 'b': add it to needs",
        id="not-upstream",
    ),
    pytest.param(
        HEAD
        + "steps:\n  a: {uses: echo}\n  b:\n    uses: notify\n    needs: a\n    with:\n      message: ${{ steps.a.outputs.value }}\n",
        "p.yaml:10:16: steps.b.with.message: step 'a' (echo) has no output 'value' (did you mean 'values'?)",
        id="unknown-output",
    ),
    pytest.param(
        HEAD
        + "params:\n  epochs: {type: integer, default: 1}\nsteps:\n  a: {uses: notify, with: {message: 'n=${{ params.epoch }}'}}\n",
        "p.yaml:7:37: steps.a.with.message: unknown param 'epoch' (did you mean 'epochs'?)",
        id="unknown-param",
    ),
    pytest.param(
        HEAD + "steps:\n  a:\n    uses: notify\n    with: {message: hi, levl: info}\n",
        "p.yaml:7:25: steps.a.with.levl: notify has no input 'levl' (did you mean 'level'?)",
        id="unknown-input",
    ),
    pytest.param(
        HEAD + "steps:\n  a:\n    uses: notify\n    with: {level: info}\n",
        "p.yaml:7:11: steps.a.with: missing required input 'message' of notify",
        id="missing-input",
    ),
    pytest.param(
        HEAD + "steps:\n  a:\n    uses: notify\n    with:\n      message: hi\n      level: loud\n",
        "p.yaml:9:14: steps.a.with.level: must be 'info', 'warning' or 'error', got 'loud'",
        id="wrong-input-type",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: echo, if: 'success('}\n",
        "p.yaml:5:23: steps.a.if: bad expression: expression ends early: expected ')'",
        id="bad-condition",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: echo, if: 'done()'}\n",
        "p.yaml:5:23: steps.a.if: bad expression: unknown function done() (use success(), failure() or always())",
        id="unknown-function",
    ),
    pytest.param(
        HEAD + "steps:\n  a: {uses: notify, with: {message: '${{ failure() }}'}}\n",
        "p.yaml:5:37: steps.a.with.message: success(), failure() and always() belong in if:, not in with:",
        id="status-function-in-with",
    ),
    pytest.param(
        HEAD + "params: {n: {type: int}}\nsteps: {a: {uses: echo}}\n",
        "p.yaml:4:20: params.n.type: must be 'string', 'integer', 'number', 'boolean', 'object' or 'array', got 'int'",
        id="bad-param-type",
    ),
    pytest.param(
        HEAD + "steps: {a: {uses: echo}}\ndescription: &d [*d]\n",
        "p.yaml:5:14: description[0]: recursive YAML alias is not allowed",
        id="recursive-alias",
    ),
    pytest.param(
        HEAD + "steps: {a: {uses: !!python/name:os.system echo}}\n",
        "p.yaml:4:19: steps.a.uses: invalid value: unsupported YAML tag 'tag:yaml.org,2002:python/name:os.system'",
        id="unsupported-tag",
    ),
    pytest.param(
        "apiVersion: slipway/v1\nkind: TestRef\nname: r\ntarget: demo-gat\n",
        "p.yaml:4:9: target: no TestTarget named 'demo-gat' (did you mean 'demo-gate'?)",
        id="missing-cross-reference",
    ),
    pytest.param(
        HEAD + "steps:\n  a:\n    uses: test_ref\n    with: {target: nope}\n",
        "p.yaml:7:20: steps.a.with.target: no TestTarget named 'nope' (known: 'demo-gate')",
        id="missing-step-input-reference",
    ),
    pytest.param(
        "apiVersion: slipway/v1\nkind: TestTarget\nname: dup\n---\napiVersion: slipway/v1\nkind: TestTarget\nname: dup\n",
        "p.yaml:7:7: name: duplicate TestTarget 'dup' (first defined at p.yaml:1)",
        id="duplicate-document",
    ),
]


@pytest.mark.parametrize(("text", "expected"), MALFORMED)
def test_malformed_document_is_reported_at_its_line_and_column(
    text: str, expected: str, test_kinds: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("p.yaml").write_text(text)
    Path("targets.yaml").write_text("apiVersion: slipway/v1\nkind: TestTarget\nname: demo-gate\n")
    with pytest.raises(PolicyError) as e:
        load(["."])
    assert e.value.lines() == [expected]
    assert str(e.value) == expected


def test_every_error_of_a_directory_is_reported_at_once_in_file_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("a.yaml").write_text(HEAD + "steps:\n  x: {uses: echo, wth: {}}\n  y: {uses: echo, needs: [z], retries: -1}\n")
    Path("b.yaml").write_text("apiVersion: slipway/v1\nkind: Pipeline\nname: q\nstpes: {}\n")
    docs, issues = collect(["."])
    assert [str(i) for i in issues] == [
        "a.yaml:5:19: steps.x: unknown key 'wth' (did you mean 'with'?)",
        "a.yaml:6:40: steps.y.retries: must be greater than or equal to 0, got -1",
        "b.yaml:1:1: missing required key 'steps'",
        "b.yaml:4:1: unknown key 'stpes' (did you mean 'steps'?)",
    ]
    assert len(docs) == 0


def test_a_valid_directory_loads_every_document_with_its_source(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("pipelines").mkdir()
    Path("pipelines/one.yaml").write_text(
        HEAD + "steps: {a: {uses: echo}}\n---\n" + HEAD.replace("p\n", "q\n") + "steps: {b: {uses: echo}}\n"
    )
    docs = load(["."])
    assert [(i.kind, i.name, i.source) for i in docs] == [
        ("Pipeline", "p", "pipelines/one.yaml:1"),
        ("Pipeline", "q", "pipelines/one.yaml:6"),
    ]
    assert docs.get("Pipeline", "q").steps["b"].uses == "echo"


def test_missing_document_lookup_suggests_the_close_name_or_lists_the_known() -> None:
    docs = load_text(HEAD.replace("name: p", "name: promote-demo") + "steps: {a: {uses: echo}}\n")
    with pytest.raises(PolicyError, match=r"^no Pipeline named 'promote-dmo' \(did you mean 'promote-demo'\?\)$"):
        docs.get("Pipeline", "promote-dmo")
    with pytest.raises(PolicyError, match=r"^no Pipeline named 'x' \(known: 'promote-demo'\)$"):
        docs.get("Pipeline", "x")
    with pytest.raises(PolicyError, match=r"^no GatePolicy named 'x' \(no GatePolicy is loaded\)$"):
        docs.get("GatePolicy", "x")


def test_missing_path_is_one_issue(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(PolicyError) as e:
        load([missing])
    assert e.value.lines() == [f"{missing}:1:1: no such file or directory"]


def test_keys_stay_text_and_yaml_scalars_keep_their_types() -> None:
    docs = load_text(
        HEAD + "params:\n  on: {type: boolean, default: yes}\nsteps:\n  a: {uses: echo, with: {values: {n: 1.5}}}\n"
    )
    p = docs.get("Pipeline", "p")
    assert p.params["on"].default is True
    assert p.steps["a"].with_ == {"values": {"n": 1.5}}


def test_needs_may_be_one_name() -> None:
    p = load_text(HEAD + "steps:\n  a: {uses: echo}\n  b: {uses: echo, needs: a}\n").get("Pipeline", "p")
    assert p.steps["b"].needs == ["a"]


VALID = """\
apiVersion: slipway/v1
kind: Pipeline
name: mutant
description: a pipeline that the property test mutates
params:
  who: {type: string, default: world}
  n: {type: integer, default: 2}
steps:
  greet:
    uses: echo
    with:
      values: {text: "hello ${{ params.who }}", n: "${{ params.n }}"}
  tell:
    uses: notify
    needs: [greet]
    if: steps.greet.outputs.values.n > 1 && success()
    retries: 1
    timeout: 30
    with:
      message: "${{ steps.greet.outputs.values.text }}"
      level: info
  after: {uses: echo, needs: tell}
---
apiVersion: slipway/v1
kind: Pipeline
name: second
steps: {only: {uses: echo}}
"""

_ALPHABET = [*":-{}[],'\"#&*!|>%@`\t\n $", "${{", "}}", "  ", "\n  ", "- ", "<<: ", "!!int ", "&a ", "*a"]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = VALID
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate-line", "swap-lines"]))
        if op == "insert":
            text = text[:pos] + draw(st.sampled_from(_ALPHABET)) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 8)) :]
        elif op == "replace":
            text = text[:pos] + draw(st.sampled_from(_ALPHABET)) + text[pos + 1 :]
        else:
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            if op == "duplicate-line":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


def test_the_unmutated_document_is_valid() -> None:
    assert len(load_text(VALID)) == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_yaml_raises_only_policy_errors(text: str) -> None:
    try:
        load_text(text, "m.yaml")
    except PolicyError as e:
        assert e.issues
        for issue in e.issues:
            assert issue.file == "m.yaml" and issue.line >= 1 and issue.col >= 1
            assert "\n" not in issue.message


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_policy_errors(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "x.yaml"
    path.write_bytes(data)
    try:
        load([path])
    except PolicyError as e:
        assert e.issues
