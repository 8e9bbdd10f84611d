"""Service identities: the worker and the gateway log in with short-lived credentials from OpenBao's database
secrets engine, set up by ``infra/vault/database.sh`` itself, each a member of its ``slipway db roles`` role and
able to do exactly what that role may."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import uuid

import pytest
from sqlalchemy.engine import make_url

from slipway.registry import DatabaseUnavailable, PermissionDenied, Registry, audit, catalog, keys, roles, usage
from tests.plugins.openbao import ROOT
from tests.plugins.pgcluster import OWNER

VAULT_LOGIN = "vault_login"


@pytest.fixture
def engine(openbao, team):
    """``infra/vault/database.sh`` run against this test's registry database; the mount's name."""
    cluster = team.cluster
    if VAULT_LOGIN not in cluster.passwords:
        cluster.login(VAULT_LOGIN, options="CREATEROLE")
        cluster.sql(f"GRANT {roles.WORKER}, {roles.GATEWAY} TO {VAULT_LOGIN} WITH ADMIN OPTION")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    mount = f"database-{uuid.uuid4().hex[:6]}"
    env.update(
        PATH=f"{openbao.workdir / 'bin'}{os.pathsep}{env.get('PATH', '')}", HOME=str(openbao.workdir),
        BAO_ADDR=openbao.url, BAO_TOKEN=openbao.root_token, DATABASE_MOUNT=mount,
        REGISTRY_HOST=f"127.0.0.1:{cluster.port}", REGISTRY_DB=team.database, REGISTRY_SSLMODE="disable",
        VAULT_DB_USER=VAULT_LOGIN, VAULT_DB_PASSWORD=cluster.passwords[VAULT_LOGIN],
    )  # fmt: skip
    done = subprocess.run(["bash", str(ROOT / "infra" / "vault" / "database.sh")], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return mount


def _creds(openbao, mount: str, service: str, *, policy: str) -> tuple[str, str, str]:
    """(user, password, lease id) read with a token that carries only ``policy`` — rewritten for this mount."""
    text = (ROOT / "infra" / "vault" / f"{policy}.hcl").read_text().replace('"database/', f'"{mount}/')
    root = openbao.client()
    root.sys.create_or_update_policy(f"{policy}-{mount}", text)
    c = openbao.client(openbao.token(policies=[f"{policy}-{mount}"]))
    got = c.secrets.database.generate_credentials(name=f"slipway-{service}", mount_point=mount)
    return got["data"]["username"], got["data"]["password"], got["lease_id"]


def _url(team, user: str, password: str) -> str:
    base = make_url(team.url(OWNER))
    return base.set(username=user, password=password).render_as_string(hide_password=False)


def test_the_gateway_leases_a_login_that_reads_keys_and_writes_usage_only(openbao, team, engine):
    with team.reg("carol").session() as s:
        _, secret = keys.create_key(s, name="svc", models=["demo"])
    user, password, lease = _creds(openbao, engine, "gateway", policy="slipway-gateway")
    assert user.startswith("slipway-gateway-")
    gw = Registry(_url(team, user, password))
    try:
        with gw.session() as s:
            assert keys.verify_key(s, secret).name == "svc"
            row = {"ts": dt.datetime.now(dt.UTC), "model": "demo", "status": 200, "event_id": uuid.uuid4().hex}
            assert usage.record_usage(s, [row]) == 1
        with pytest.raises(PermissionDenied, match="permission denied for table models"), gw.session() as s:
            catalog.list_models(s)
        with pytest.raises(PermissionDenied, match="permission denied for table models"):  # not even to look
            with gw.session() as s:
                catalog.set_alias(s, model="demo", alias="staging", version=2)
    finally:
        gw.dispose()
        openbao.client().sys.revoke_lease(lease)


def test_the_worker_leases_an_operator_login_and_the_audit_names_the_lease(openbao, team, engine):
    user, password, lease = _creds(openbao, engine, "worker", policy="slipway-worker")
    worker = Registry(_url(team, user, password), actor="flow-run 5f0c")
    try:
        with worker.session() as s:
            catalog.create_version(s, model="demo")
        with pytest.raises(PermissionDenied, match="needs membership of database role 'release_manager'"):
            with worker.session() as s:
                catalog.set_alias(s, model="demo", alias="production", version=4)
        with team.reg(OWNER).session() as s:
            last = audit.list_events(s, action="version.create", limit=1)[0]
            assert (last.actor, last.via) == (user, "flow-run 5f0c")
    finally:
        worker.dispose()
        openbao.client().sys.revoke_lease(lease)
    with pytest.raises(DatabaseUnavailable, match="password authentication failed"):  # the lease took it away
        Registry(_url(team, user, password)).check()


def test_a_gateway_token_cannot_lease_worker_credentials(openbao, engine):
    import hvac

    with pytest.raises(hvac.exceptions.Forbidden):
        _creds(openbao, engine, "worker", policy="slipway-gateway")
