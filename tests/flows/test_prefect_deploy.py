"""prefect.yaml against a real local Prefect server: deploy every deployment, and let a process-pool worker
execute one; the pipeline run it makes is recorded in the registry."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(REPO / ".venv/bin/prefect")
POOL = "slipway-local"

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect-server")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Prefect server of its own (``prefect server start``) and the environment that reaches it."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "SLIPWAY_HOME": str(tmp_path / "slipway"),
    }
    env.pop("SLIPWAY_DATABASE_URL", None)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("prefect server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield env
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def _prefect(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    r = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_prefect_yaml_deploys_and_a_worker_run_is_recorded_in_the_registry(prefect_env, tmp_path) -> None:
    _prefect(prefect_env, "work-pool", "create", POOL, "--type", "process")
    out = _prefect(prefect_env, "--no-prompt", "deploy", "--all")
    for name in ("hello", "promote", "finetune-demo", "nightly-eval", "cost-report", "compliance-check", "reconcile"):
        assert f"slipway-pipeline/{name}" in out, out
    assert "interval" in (inspected := _prefect(prefect_env, "deployment", "inspect", "slipway-pipeline/reconcile"))
    assert re.search(r"0:05:00|300", inspected), inspected
    assert "0 4 * * *" in _prefect(prefect_env, "deployment", "inspect", "slipway-pipeline/compliance-check")
    assert "0 2 * * *" in _prefect(prefect_env, "deployment", "inspect", "slipway-pipeline/nightly-eval")
    out = _prefect(
        prefect_env, "deployment", "run", "slipway-pipeline/hello", "--params", '{"params": {"who": "deploy"}}'
    )
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert flow_run_id, out

    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--run-once"],
        cwd=tmp_path,
        env=prefect_env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        worker.wait(240)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker_log.close()

    from slipway.registry import Registry, runs

    reg = Registry(f"sqlite:///{Path(prefect_env['SLIPWAY_HOME']) / 'registry.db'}")
    try:
        with reg.session() as s:
            (run,) = runs.list_runs(s)
            assert (run.pipeline, run.status, run.params["who"]) == ("hello", "succeeded", "deploy"), (
                run.error,
                (tmp_path / "worker.log").read_text()[-3000:],
            )
            assert run.prefect_flow_run_id == flow_run_id.group(1)
            assert {st.name: st.status for st in run.steps} == {
                "greet": "succeeded",
                "count": "succeeded",
                "report": "succeeded",
                "shout": "skipped",
            }
    finally:
        reg.dispose()
