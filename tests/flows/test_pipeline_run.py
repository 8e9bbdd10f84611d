"""The runner, for real: Prefect flows on a local Prefect server, recorded in a real registry."""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path

import pytest

from slipway.registry import runs

pytestmark = [pytest.mark.xdist_group("prefect"), pytest.mark.slow]


def _steps(reg, run_id):
    with reg.session() as s:
        r = runs.get_run(s, run_id)
        return r, {st.name: st for st in r.steps}


def test_independent_steps_overlap_in_time(run_yaml, sqlite_registry):
    result = run_yaml(
        """
        apiVersion: slipway/v1
        kind: Pipeline
        name: overlap
        steps:
          left:  {uses: "python:tests.pipeline_steps:sleep", with: {seconds: 2, label: left}}
          right: {uses: "python:tests.pipeline_steps:sleep", with: {seconds: 2, label: right}}
          join:
            uses: "python:tests.pipeline_steps:add"
            needs: [left, right]
            with: {a: 1, b: 2}
        """
    )
    assert result.status == "succeeded", result.error
    run, steps = _steps(sqlite_registry, result.run_id)
    left, right = steps["left"], steps["right"]
    overlap = min(left.finished_at, right.finished_at) - max(left.started_at, right.started_at)
    assert overlap.total_seconds() > 1.5, (left.started_at, left.finished_at, right.started_at, right.finished_at)
    assert (run.finished_at - run.started_at).total_seconds() < 3.9
    assert steps["join"].started_at >= max(left.finished_at, right.finished_at)
    assert steps["join"].outputs == {"total": 3}


FAILING = """
    apiVersion: slipway/v1
    kind: Pipeline
    name: breaks
    params:
      failures: {type: integer, default: 1}
      dir: {type: string}
    steps:
      first:  {uses: "python:tests.pipeline_steps:counted", with: {counter: "${{ params.dir }}/first"}}
      other:  {uses: "python:tests.pipeline_steps:counted", with: {counter: "${{ params.dir }}/other"}}
      shaky:
        uses: "python:tests.pipeline_steps:flaky"
        needs: [first]
        with: {counter: "${{ params.dir }}/shaky", failures: "${{ params.failures }}"}
      after:
        uses: "python:tests.pipeline_steps:counted"
        needs: [shaky]
        with: {counter: "${{ params.dir }}/after"}
      last:
        uses: "python:tests.pipeline_steps:add"
        needs: [after, other]
        with: {a: "${{ steps.shaky.outputs.calls }}"}
      on-failure:
        uses: notify
        needs: [shaky]
        if: failure()
        with: {message: "shaky failed"}
"""


def test_failed_step_skips_downstream_and_resume_reruns_only_what_did_not_complete(run_yaml, sqlite_registry, tmp_path):
    d = str(tmp_path)
    failed = run_yaml(FAILING, {"dir": d})
    assert failed.status == "failed"
    assert failed.error.startswith("step 'shaky' failed: RuntimeError: flaky failure 1 of 1")
    run, steps = _steps(sqlite_registry, failed.run_id)
    assert run.status == "failed" and run.finished_at is not None
    status = {n: st.status for n, st in steps.items()}
    assert status == {
        "first": "succeeded",
        "other": "succeeded",
        "shaky": "failed",
        "after": "skipped",
        "last": "skipped",
        "on-failure": "succeeded",
    }
    assert steps["after"].error == "skipped: 'shaky' failed"
    assert steps["last"].error == "skipped: 'after' skipped"
    assert steps["shaky"].error == "RuntimeError: flaky failure 1 of 1"
    assert steps["shaky"].attempts == 1

    resumed = run_yaml(FAILING, resume=failed.run_id)
    assert resumed.status == "succeeded", resumed.error
    run2, steps2 = _steps(sqlite_registry, resumed.run_id)
    assert run2.resumed_from == failed.run_id
    assert run2.params == {"failures": 1, "dir": d}  # taken from the resumed run
    # Reused steps were not executed again; the others ran exactly once more.
    calls = {name: int((tmp_path / name).read_text()) for name in ("first", "other", "shaky", "after")}
    assert calls == {"first": 1, "other": 1, "shaky": 2, "after": 1}
    assert {n for n, st in steps2.items() if st.reused_from} == {"first", "other"}
    assert steps2["first"].reused_from == failed.run_id and steps2["first"].outputs == {"calls": 1}
    assert steps2["last"].outputs == {"total": 2}
    assert steps2["on-failure"].status == "skipped"
    assert steps2["on-failure"].error == "skipped: if: failure() is false"


def test_retries_are_honoured(run_yaml, sqlite_registry, tmp_path):
    result = run_yaml(
        """
        apiVersion: slipway/v1
        kind: Pipeline
        name: retry
        params: {counter: {type: string}}
        steps:
          shaky:
            uses: "python:tests.pipeline_steps:flaky"
            retries: 2
            with: {counter: "${{ params.counter }}", failures: 2}
        """,
        {"counter": str(tmp_path / "n")},
    )
    assert result.status == "succeeded", result.error
    _, steps = _steps(sqlite_registry, result.run_id)
    assert steps["shaky"].attempts == 3
    assert steps["shaky"].outputs == {"calls": 3}
    assert steps["shaky"].error is None


def test_too_few_retries_fail_with_the_last_error(run_yaml, sqlite_registry, tmp_path):
    result = run_yaml(
        """
        apiVersion: slipway/v1
        kind: Pipeline
        name: retry-short
        params: {counter: {type: string}}
        steps:
          shaky:
            uses: "python:tests.pipeline_steps:flaky"
            retries: 1
            with: {counter: "${{ params.counter }}", failures: 2}
        """,
        {"counter": str(tmp_path / "n")},
    )
    assert result.status == "failed"
    _, steps = _steps(sqlite_registry, result.run_id)
    assert (steps["shaky"].attempts, steps["shaky"].error) == (2, "RuntimeError: flaky failure 2 of 2")


def test_a_later_failure_undoes_succeeded_steps_that_can_be_undone_latest_first(
    run_yaml, sqlite_registry, tmp_path, request
):
    """A saga's compensation: `canary` registers such an undo (back to the committed production at 100 %), so a
    canary whose promotion fails does not stay at 100 %."""
    from slipway.flows.steptypes import STEP_TYPES, step_type
    from slipway.registry import audit
    from tests.pipeline_steps import _release, reserve

    step_type("test_reserve", undo=_release)(reserve)
    request.addfinalizer(lambda: STEP_TYPES.pop("test_reserve"))

    ledger = tmp_path / "ledger"
    result = run_yaml(
        """
        apiVersion: slipway/v1
        kind: Pipeline
        name: saga
        params: {ledger: {type: string}, counter: {type: string}}
        steps:
          first:  {uses: test_reserve, with: {ledger: "${{ params.ledger }}", item: a}}
          second: {uses: test_reserve, needs: first, with: {ledger: "${{ params.ledger }}", item: b}}
          boom:
            uses: "python:tests.pipeline_steps:flaky"
            needs: second
            with: {counter: "${{ params.counter }}", failures: 5}
        """,
        {"ledger": str(ledger), "counter": str(tmp_path / "n")},
    )
    assert result.status == "failed"
    assert ledger.read_text().splitlines() == ["reserve a", "reserve b", "release b", "release a"]
    assert "undone: second: released b; first: released a" in result.error
    with sqlite_registry.session() as s:
        assert [e.after["step"] for e in audit.list_events(s, action="pipeline.undo")] == ["first", "second"]


def test_timeout_fails_the_step(run_yaml, sqlite_registry):
    result = run_yaml(
        """
        apiVersion: slipway/v1
        kind: Pipeline
        name: slow
        steps:
          slow: {uses: "python:tests.pipeline_steps:busy", timeout: 0.5, with: {seconds: 5}}
        """
    )
    assert result.status == "failed"
    _, steps = _steps(sqlite_registry, result.run_id)
    assert steps["slow"].error.startswith("timed out")
    assert (steps["slow"].finished_at - steps["slow"].started_at).total_seconds() < 3


def test_false_condition_skips_and_expressions_carry_types(run_yaml, sqlite_registry):
    result = run_yaml(
        """
        apiVersion: slipway/v1
        kind: Pipeline
        name: cond
        params:
          n: {type: integer, default: 2}
          go: {type: boolean, default: false}
        steps:
          double: {uses: "python:tests.pipeline_steps:add", with: {a: "${{ params.n }}", b: "${{ params.n }}"}}
          big:
            uses: echo
            needs: double
            if: steps.double.outputs.total >= 4 && !params.go
            with: {values: {text: "total=${{ steps.double.outputs.total }}", raw: "${{ steps.double.outputs.total }}"}}
          never: {uses: echo, needs: double, if: "${{ params.go }}"}
        """,
        {"n": "2"},
    )
    assert result.status == "succeeded", result.error
    _, steps = _steps(sqlite_registry, result.run_id)
    assert steps["big"].outputs == {"values": {"text": "total=4", "raw": 4}}
    assert steps["never"].status == "skipped"


def test_bad_params_are_refused_before_anything_runs(run_yaml, sqlite_registry):
    from slipway.flows.compiler import ParamError

    with pytest.raises(ParamError) as e:
        run_yaml(
            """
            apiVersion: slipway/v1
            kind: Pipeline
            name: p
            params: {epochs: {type: integer}}
            steps: {a: {uses: echo}}
            """,
            {"epoch": "3"},
        )
    assert str(e.value) == (
        "unknown param 'epoch' for pipeline 'p' (did you mean 'epochs'?); param 'epochs' is required (integer)"
    )
    with sqlite_registry.session() as s:
        assert runs.list_runs(s) == []


APPROVAL = """
    apiVersion: slipway/v1
    kind: Pipeline
    name: needs-approval
    steps:
      build: {uses: echo, with: {values: {v: 3}}}
      sign-off:
        uses: approve
        needs: build
        with: {message: "ship v${{ steps.build.outputs.values.v }}?"}
      ship: {uses: echo, needs: sign-off, with: {values: {by: "${{ steps.sign-off.outputs.approver }}"}}}
"""


def _run_in_background(run_yaml, text):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("result", run_yaml(text)), daemon=True)
    t.start()
    return t, box


def _wait_paused(reg, step, deadline=60.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with reg.session() as s:
            for r in runs.list_runs(s):
                if any(st.name == step and st.status == "paused" for st in r.steps):
                    assert r.status == "paused"
                    return r.id
        time.sleep(0.2)
    raise AssertionError(f"step {step} never paused")


def test_approval_pauses_the_run_and_resumes_it_recorded_with_who_and_when(run_yaml, sqlite_registry):
    from slipway.flows.approvals import give_approval
    from slipway.registry import catalog

    t, box = _run_in_background(run_yaml, APPROVAL)
    run_id = _wait_paused(sqlite_registry, "sign-off")
    _, steps = _steps(sqlite_registry, run_id)
    assert steps["ship"].status == "pending"
    given = give_approval(sqlite_registry, run_id[:8], comment="looks good", actor="ana")
    t.join(60)
    assert not t.is_alive()
    result = box["result"]
    assert result.status == "succeeded", result.error
    _, steps = _steps(sqlite_registry, run_id)
    assert steps["sign-off"].outputs["approver"] == "ana"
    assert steps["ship"].outputs == {"values": {"by": "ana"}}
    with sqlite_registry.session() as s:
        (appr,) = catalog.approvals_for(s, f"run:{run_id}/sign-off")
        assert (appr.approver, appr.decision, appr.comment, appr.id) == ("ana", "approved", "looks good", given.id)
        assert appr.created_at is not None


def test_rejection_fails_the_approve_step_and_skips_downstream(run_yaml, sqlite_registry):
    from slipway.flows.approvals import ApprovalError, give_approval

    t, box = _run_in_background(run_yaml, APPROVAL)
    run_id = _wait_paused(sqlite_registry, "sign-off")
    with pytest.raises(ApprovalError, match=r"step 'ship' of run .* is not waiting for an approval"):
        give_approval(sqlite_registry, run_id, step="ship", actor="bob")
    give_approval(sqlite_registry, run_id, decision="rejected", comment="not today", actor="bob")
    t.join(60)
    result = box["result"]
    assert result.status == "failed"
    _, steps = _steps(sqlite_registry, run_id)
    assert steps["sign-off"].error == "Rejected: rejected by bob: not today"
    assert steps["ship"].status == "skipped"


def test_failure_and_resume_are_recorded_on_postgresql(prefect_api, pg_registry, tmp_path):
    from slipway.flows import runner

    path = Path(tmp_path / "p.yaml")
    path.write_text(
        "apiVersion: slipway/v1\nkind: Pipeline\nname: pg\nparams: {dir: {type: string}}\nsteps:\n"
        "  a: {uses: 'python:tests.pipeline_steps:counted', with: {counter: '${{ params.dir }}/a'}}\n"
        "  b: {uses: 'python:tests.pipeline_steps:flaky', needs: a,"
        " with: {counter: '${{ params.dir }}/b', failures: 1}}\n"
    )
    kw = {"policies": str(tmp_path / "none"), "registry": pg_registry}
    first = runner.run(str(path), {"dir": str(tmp_path)}, **kw)
    assert first.status == "failed"
    second = runner.run(str(path), resume=first.run_id, **kw)
    assert second.status == "succeeded"
    _, steps = _steps(pg_registry, second.run_id)
    assert steps["a"].reused_from == first.run_id and steps["b"].attempts == 1


ONE_STEP = """
    apiVersion: slipway/v1
    kind: Pipeline
    name: once
    steps:
      sum: {uses: "python:tests.pipeline_steps:add", with: {a: 1, b: 2}}
"""


def _count_loads(monkeypatch) -> list[object]:
    """Every time the pipeline's documents are read from disk (``load_plan`` reads them with ``collect``)."""
    from slipway.policies import loader

    calls: list[object] = []
    real = loader.collect

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "collect", counting)
    return calls


def test_a_run_loads_its_pipeline_once(run_yaml, monkeypatch):
    loads = _count_loads(monkeypatch)
    result = run_yaml(ONE_STEP)
    assert result.status == "succeeded", result.error
    assert len(loads) == 1  # the check before the flow run; the flow run reuses that plan


def test_a_run_given_the_loaded_plan_does_not_load_it_again(prefect_api, sqlite_registry, tmp_path, monkeypatch):
    from slipway.flows import compiler, runner

    path = tmp_path / "once.yaml"
    path.write_text(textwrap.dedent(ONE_STEP))
    policies = str(tmp_path / "no-policies")
    loaded = compiler.load_plan(str(path), policies=policies)
    loads = _count_loads(monkeypatch)
    result = runner.run(str(path), policies=policies, registry=sqlite_registry, loaded=loaded)
    assert result.status == "succeeded", result.error
    assert result.outputs == {"sum": {"total": 3}}
    assert loads == []
