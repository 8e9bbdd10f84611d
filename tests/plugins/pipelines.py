"""Pipeline fixtures: one Prefect API per test session (``prefect_test_harness``, a real local server),
and a helper that writes a pipeline YAML and runs it against a test registry.

Tests that run flows are marked ``xdist_group("prefect")`` so they share one worker and one server.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A temporary Prefect server for the session; its API URL."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture
def run_yaml(prefect_api: str, sqlite_registry: Any, tmp_path: Path) -> Callable[..., Any]:
    """``run_yaml(text, params=None, resume=None)``: write the pipeline and run it on the SQLite registry."""
    from slipway.flows import runner

    def go(text: str, params: dict[str, Any] | None = None, *, resume: str | None = None, **kw: Any) -> Any:
        path = tmp_path / "pipeline.yaml"
        path.write_text(textwrap.dedent(text))
        return runner.run(
            str(path),
            params or {},
            resume=resume,
            policies=str(tmp_path / "no-policies"),
            registry=sqlite_registry,
            **kw,
        )

    return go
