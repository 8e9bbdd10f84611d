"""Serving fixtures: one local Ray with two logical GPUs per test session, Serve on a free loopback port, a
tiny real model in the registry, and the gateway in front of it (two replicas sharing Redis).

Every test that uses them is marked ``xdist_group("ray")`` so they share one worker and one Ray.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.openbao import PROMPTS_KEY, SLIPWAY_POLICY, OpenBao

REDIS_URL = os.environ.get("SLIPWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TINY = "tiny"
ECHO = "echo"
PROMPT_LOG_KEY = PROMPTS_KEY  # the transit key infra/vault creates: the slipway policy may not create one
# The gateway's budgets: only keys of this team count against the hard limit (other tests never hit it). The
# echo model costs $0.01 a token; the budget's name is fresh per session so Redis holds no earlier spend.
BUDGET_TEAM = "budget-drill"
BUDGET_HARD = 2.0
BUDGET_NAME = f"drill-{uuid.uuid4().hex[:8]}"
BUDGET = {
    "apiVersion": "slipway/v1",
    "kind": "CostBudget",
    "name": "serving-tests",
    "pricing": {"tokens": [{"model": ECHO, "prompt_per_1k": 10.0, "completion_per_1k": 10.0}]},
    "budgets": [{"name": BUDGET_NAME, "team": BUDGET_TEAM, "window": "day", "hard": BUDGET_HARD}],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ok() -> bool:
    """Whether the Redis server answers; with ``CI=true`` an unreachable one fails the test instead (the
    cross-replica limit and budget tests must not pass CI untested), as PostgreSQL's fixture does."""
    import redis

    try:
        return bool(redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except Exception as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"Redis required in CI but unreachable at {REDIS_URL}: {e}")
        return False


@dataclass
class Stack:
    """What a serving test talks to."""

    base_url: str
    registry: Any
    redis_url: str | None

    def key(self, *, models: tuple[str, ...] = (), rpm: int | None = None, tpm: int | None = None, **kw: Any) -> str:
        """A fresh API key's secret."""
        from slipway.registry import keys

        with self.registry.session() as s:
            _k, secret = keys.create_key(s, name=f"k-{uuid.uuid4().hex[:10]}", models=models, rpm=rpm, tpm=tpm, **kw)
        return secret

    def client(self, secret: str, **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=secret, max_retries=0, **kw)


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[str]:
    """A Ray started for this session (2 CPUs, 2 logical GPUs) and Serve's HTTP proxy on a free loopback port;
    yields the base URL."""
    import ray
    from ray import serve

    port = _free_port()
    # address="local": always a Ray of our own, never one a user (or `make demo`) left running.
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=2,
        namespace="slipway",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slipway.llm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, n_layer=2, n_embd=64, n_head=2)


@pytest.fixture(scope="session")
def serving_registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Any]:
    """A SQLite registry holding ``tiny`` v1-v2 (real weights in a file artifact store) and ``echo`` v1-v2."""
    from slipway.artifacts.resolve import open_store
    from slipway.registry import Registry, catalog
    from slipway.registry.catalog import ArtifactSpec

    root = tmp_path_factory.mktemp("serving")
    reg = Registry(f"sqlite:///{root / 'registry.db'}", actor="tester")
    reg.upgrade()
    ref = open_store((root / "artifacts").as_uri()).put_dir("tiny/base", tiny_model_dir)
    with reg.session() as s:
        for model in (TINY, ECHO):
            catalog.create_model(s, name=model)
        for v in (1, 2):
            spec = ArtifactSpec("model", ref.uri, ref.sha256, ref.size)
            catalog.create_version(s, model=TINY, version=v, artifacts=[spec] if v == 1 else [])
            catalog.create_version(s, model=ECHO, version=v)
    yield reg
    reg.dispose()


@dataclass(frozen=True)
class PromptLogVault:
    """Where the gateway's prompt logs are sealed (OpenBao transit, a token of the ``slipway`` policy) and stored."""

    url: str
    token: str
    artifact_root: str


@pytest.fixture(scope="session")
def prompt_log_vault(openbao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> PromptLogVault:
    """The session's OpenBao for the gateway's prompt logs, and the artifact root they are stored under."""
    token = openbao.token(policies=[SLIPWAY_POLICY], ttl="24h")
    return PromptLogVault(openbao.url, token, tmp_path_factory.mktemp("prompt-logs").as_uri())


@pytest.fixture(scope="session")
def stack(
    ray_serve: str, serving_registry: Any, tiny_model_dir: Path, prompt_log_vault: PromptLogVault
) -> Iterator[Stack]:
    """The gateway (two replicas, Redis when reachable) with ``tiny`` v1 (real model, two replicas at
    0.5 GPU each) and ``echo`` v1 + v2 live."""
    from slipway.policies.servingconfig import ServingConfig
    from slipway.serve import control

    redis_url = REDIS_URL if _redis_ok() else None
    if redis_url:
        import redis

        r = redis.from_url(redis_url)
        for k in r.scan_iter("slipway:*"):
            r.delete(k)
    control.deploy_gateway(
        {
            "database_url": str(serving_registry.engine.url.render_as_string(hide_password=False)),
            "redis_url": redis_url,
            "key_cache_ttl_s": 0.5,
            "jwt_secret": "test-secret-for-jwt-hs256-32bytes!",
            "budget": BUDGET,
            # exchanges with TINY are logged: redacted, sealed by OpenBao's transit, stored as files
            "prompt_log": {"models": [TINY], "encryption": "vault", "transit_key": PROMPT_LOG_KEY, "batch_size": 5},
            "prompt_log_flush_s": 0.5,
        },
        num_replicas=2,
        env={
            "SLIPWAY_VAULT_ADDR": prompt_log_vault.url,
            "SLIPWAY_VAULT_AUTH": "token",
            "SLIPWAY_VAULT_TOKEN": prompt_log_vault.token,
            "SLIPWAY_ARTIFACT_ROOT": prompt_log_vault.artifact_root,
        },
    )
    tiny_cfg = ServingConfig.for_model(
        TINY,
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.1, "num_gpus": 0.5},
        max_batch_size=16,
        batch_wait_timeout_s=0.05,
        max_prompt_tokens=64,
        max_new_tokens=64,
        default_max_tokens=8,
        cache={"enabled": True, "ttl_s": 60},
    )
    control.deploy_version(TINY, 1, config=tiny_cfg, registry=serving_registry)
    echo_cfg = ServingConfig.for_model(
        ECHO, backend="echo", ray_actor_options={"num_cpus": 0.1}, max_batch_size=32, batch_wait_timeout_s=0.005
    )
    for v in (1, 2):
        control.deploy_version(ECHO, v, config=echo_cfg, registry=serving_registry)
    base = ray_serve
    _wait_ready(base)
    yield Stack(base, serving_registry, redis_url)
    from ray import serve

    for app in list(serve.status().applications):
        serve.delete(app)


@pytest.fixture(autouse=True, scope="module")
def _serve_apps_left_by_the_module() -> Iterator[None]:
    """Delete the Serve applications a test module deployed and left running (and their routing-table entries):
    the session's Ray has 2 CPUs, and replicas a module forgot would leave later modules' deployments pending
    forever. The session's own applications (the ``stack`` fixture's) stay."""
    yield
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    from slipway.serve.gateway import GATEWAY_APP
    from slipway.serve.store import get_store

    keep = {GATEWAY_APP, f"{TINY}-v1", f"{ECHO}-v1", f"{ECHO}-v2"}
    try:
        apps = set(serve.status().applications)
    except Exception:  # no Serve in this session
        return
    gone = apps - keep
    store = get_store()
    _rev, table = ray.get(store.snapshot.remote())
    for model, entry in table.items():
        for v, e in list(entry["versions"].items()):
            if e["app"] in gone:
                ray.get(store.drop_version.remote(model, int(v)))
    for app in gone:
        serve.delete(app)


def _wait_ready(base: str, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}/health", timeout=2)
            if r.status_code == 200 and {TINY, ECHO} <= set(r.json()["models"]):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"gateway at {base} did not become ready")


@pytest.fixture
def new_key(stack: Stack) -> Callable[..., str]:
    return stack.key


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make ``--dist loadgroup`` work under pytest 9: pytest-xdist 3.8 tags grouped items by assigning
    ``item._nodeid``, which pytest 9 no longer reads (node ids live in ``item._id``), so groups were split
    across workers and each worker started its own Ray. Re-apply the tag where it did not take."""
    if not getattr(config.option, "loadgroup", False):  # set on workers by xdist for --dist loadgroup
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})  # fmt: skip
        if names and "@" not in item.nodeid and hasattr(item, "_id"):
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")
