"""A real Prometheus server for the tests: Debian's ``prometheus`` package (``make test`` installs it), started as
a process of the test on a free loopback port with its own data directory, scraping the targets a test gives it
every second and evaluating the shipped alert rules (infra/observability/alerts.yml) every second. Stopped by
its PID. Outside CI a missing binary skips the test; with ``CI=true`` it fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "infra" / "observability" / "alerts.yml"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str) -> str:
    """The path of ``name`` (``prometheus``, ``promtool``); skips outside CI when missing, fails in CI."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (make test installs Debian's prometheus package)"
        if _in_ci():
            pytest.fail(f"{why}; required in CI")
        pytest.skip(why)
    return path


class Prometheus:
    """One ``prometheus`` process scraping ``targets`` (``host:port`` of /metrics endpoints)."""

    def __init__(self, binary: str, workdir: Path, targets: list[str], rule_files: list[Path]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ready_s = self._wait_ready()

    def _wait_ready(self, timeout_s: float = 30) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return round(time.monotonic() - self.started, 1)
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"prometheus did not become ready:\n{self.log_path.read_text()[-3000:]}")

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # a bad query answers 400 with the parser's words
            body = json.load(e)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (``/api/v1/query``); raises on a query Prometheus refuses."""
        data = self._get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def wait_for(self, expr: str, timeout_s: float = 60) -> list[dict[str, Any]]:
        """The first non-empty result of ``expr``, polled every half second."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def alerts(self) -> dict[str, list[dict[str, Any]]]:
        """Active (pending or firing) alerts by name."""
        out: dict[str, list[dict[str, Any]]] = {}
        for a in self._get("/api/v1/alerts")["alerts"]:
            out.setdefault(a["labels"]["alertname"], []).append(a)
        return out

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rules, with each one's health and last evaluation error."""
        return [r for g in self._get("/api/v1/rules")["groups"] for r in g["rules"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    """Starts a :class:`Prometheus` scraping the given targets with the shipped alert rules; stops it after."""
    binary = require_binary("prometheus")
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        started.append(Prometheus(binary, workdir, targets, [ALERTS]))
        return started[-1]

    yield start
    for p in started:
        p.stop()
