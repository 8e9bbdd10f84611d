"""The local Ray that slipway starts (``serve up``, the demo, a canary step) and ends (``serve down``).

Each test runs slipway in a child process with its own ``SLIPWAY_HOME`` and Ray temp dir, so it never meets the
test session's Ray, and ends only what it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("ray")

SCRIPT = """
import json, sys
from slipway.serve import local
if sys.argv[1] == "start":
    started = local.connect(start=True)
    print(json.dumps({"started": started, "state": local.read_state()}))
elif sys.argv[1] == "connect":
    import time
    t = time.monotonic()
    try:
        local.connect(start=False)
        print(json.dumps({"error": None, "s": time.monotonic() - t}))
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}", "s": time.monotonic() - t}))
else:
    print(json.dumps(local.down()))
"""


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A Ray temp dir of this test alone (short: Ray's socket paths must fit in 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="swray", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run(home: Path, ray_tmp: Path, *args: str, timeout: float = 180, user_home: Path | None = None) -> dict:
    env = {
        **os.environ,
        **({"HOME": str(user_home)} if user_home else {}),  # where Ray looks for ~/.ray/auth_token
        "SLIPWAY_HOME": str(home),
        "RAY_TMPDIR": str(ray_tmp),  # Ray's temp dir, and its ray_current_cluster file, of this test alone
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _session_alive(session: int) -> list[int]:
    from slipway.serve.local import _session_pids

    return _session_pids(session)


@pytest.mark.slow
@pytest.mark.parametrize("token", [True, False], ids=["token-auth", "no-token"])
def test_serve_down_ends_the_ray_slipway_started_and_only_it(
    tmp_path: Path, ray_tmp: Path, request: pytest.FixtureRequest, token: bool
) -> None:
    """With a Ray token in ~/.ray (any earlier local ray.init leaves one) `ray start` turns token auth on, and
    slipway's client must follow; without one both run without."""
    from slipway.serve.local import _kill_session

    user_home = tmp_path / "user"
    if token:
        (user_home / ".ray").mkdir(parents=True)
        (user_home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)
    else:
        user_home.mkdir()
    out = _run(tmp_path, ray_tmp, "start", user_home=user_home)
    head = out["state"]["ray"]
    request.addfinalizer(lambda: _kill_session(head["session"]))  # whatever happens below
    assert out["started"] is True and head["address"].startswith("127.0.0.1:")
    assert _session_alive(head["session"]), "the Ray processes run in the session recorded"
    port = head["address"].rsplit(":", 1)[1]
    assert (ray_tmp / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{port}")

    down = _run(tmp_path, ray_tmp, "down", user_home=user_home)

    assert down == {"stopped_ray": True}
    deadline = time.monotonic() + 15
    while _session_alive(head["session"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_alive(head["session"]) == []
    assert not (tmp_path / "serve.json").exists()
    assert not (ray_tmp / "ray" / "ray_current_cluster").exists(), "no dead address left for the next ray.init"
    # nothing outside that session was ended: this process and the one that started it are alive
    still = {int(d.name) for d in Path("/proc").glob("[0-9]*")}
    assert os.getpid() in still and os.getppid() in still


def test_a_dead_local_ray_is_detected_in_seconds(tmp_path: Path, ray_tmp: Path) -> None:
    """A Ray killed without ``ray stop`` leaves its address behind; connecting must not wait minutes for it."""
    from tests.plugins.serving import _free_port

    dead = f"127.0.0.1:{_free_port()}"  # nothing listens there
    (tmp_path / "serve.json").write_text(json.dumps({"ray": {"address": dead, "session": 0}}))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)

    out = _run(tmp_path, ray_tmp, "connect", timeout=60)

    assert out["error"] == "ServeUnavailable: no Ray cluster reachable on this machine: run `slipway serve up`"
    assert out["s"] < 10
