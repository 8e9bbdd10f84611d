"""Who may do what on a PostgreSQL registry, decided by the database: distinct login roles on a cluster of our own.

The cast (each a login role with its own password; SCRAM over TCP):

- ``registry_owner``: owns the tables (ran the migrations and ``slipway db roles``), may create roles;
- ``ana``, ``bob``, ``mallory``: ``slipway_operator``; ana registers the versions (she is the requester);
- ``carol``: ``slipway_admin``; ``rita``: ``slipway_reader``;
- ``dave``, ``erin``: ``slipway_operator`` and ``release_manager``, the role protecting ``demo@production``.

Every attack of issue 17 is tried and must change nothing: aliases, versions, approvals and the audit chain are
compared before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from slipway.registry import AliasConflict, AlreadyExists, ProtectedAlias, audit, catalog, roles
from slipway.registry.errors import PermissionDenied
from tests.plugins.pgcluster import OWNER, Team


def _production(t: Team) -> int:
    with t.reg(OWNER).session() as s:
        return catalog.get_alias(s, "demo", "production").version.version


SLIPWAY = [sys.executable, "-m", "slipway.cli"]


def cli(t: Team, role: str, *args: str, actor: str | None = None, cwd: Path | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIPWAY_")}
    env["SLIPWAY_DATABASE_URL"] = t.url(role)
    if actor:
        env["SLIPWAY_ACTOR"] = actor
    return subprocess.run([*SLIPWAY, *args], capture_output=True, text=True, env=env, timeout=120, cwd=cwd)


# --- what the roles may do ---------------------------------------------------------------------------------------


def test_the_actor_is_the_login_role_and_the_claimed_name_only_sits_beside_it(team):
    with team.reg("mallory", label="dave").session() as s:  # SLIPWAY_ACTOR=dave, logged in as mallory
        catalog.set_alias(s, model="demo", alias="staging", version=2, expected=1)
    with team.reg(OWNER).session() as s:
        last = audit.list_events(s, action="alias.set", limit=1)[0]
        assert (last.actor, last.via, last.after["version"]) == ("mallory", "dave", 2)
        assert catalog.get_alias(s, "demo", "staging").updated_by == "mallory"
        assert {v.created_by for v in catalog.list_versions(s, "demo")} == {"ana"}
        assert audit.verify(s) == []


def test_a_step_s_flow_run_is_recorded_beside_the_login_role(team):
    """A pipeline step acts as the worker's login; its Prefect flow run (and any claimed label) sit beside it."""
    from slipway.flows.steptypes import StepContext

    ctx = StepContext(
        run_id="r1", step="s", pipeline="p", model="demo", params={}, registry=team.reg("mallory", label="ci-bot"),
        documents=None, actor="ci-bot", flow_run="7f1c",
    )  # fmt: skip
    with ctx.session() as s:
        catalog.set_alias(s, model="demo", alias="staging", version=2, expected=1)
    with team.reg(OWNER).session() as s:
        last = audit.list_events(s, action="alias.set", limit=1)[0]
        assert (last.actor, last.via) == ("mallory", "ci-bot, prefect flow run 7f1c")
        assert audit.verify(s) == []


def test_a_member_of_the_protecting_role_moves_production_and_the_audit_names_them(team):
    with team.reg("dave").session() as s:
        catalog.set_alias(s, model="demo", alias="production", version=2, expected=1)
    assert _production(team) == 2
    with team.reg(OWNER).session() as s:
        last = audit.list_events(s, action="alias.set", limit=1)[0]
        assert (last.actor, last.via, last.after) == ("dave", None, {"version": 2, "approval_id": None, "role": None})


def test_an_approval_by_a_member_of_the_role_lets_the_requester_move_production(team):
    with team.reg("erin").session() as s:
        appr = catalog.record_approval(s, subject="version:demo:2", role="release_manager")
        assert appr.approver == "erin"
    with team.reg("ana").session() as s:
        catalog.set_alias(s, model="demo", alias="production", version=2, expected=1, approval_id=appr.id)
    assert _production(team) == 2


def test_the_gateway_role_reads_keys_and_writes_usage_and_nothing_else(team):
    import datetime as dt

    from slipway.registry import keys, usage

    with team.reg("carol").session() as s:
        _, secret = keys.create_key(s, name="svc", models=["demo"])
    gw = team.reg(roles.GATEWAY)
    with gw.session() as s:
        assert keys.verify_key(s, secret).name == "svc"
        now = dt.datetime.now(dt.UTC)
        rows = [{"ts": now, "model": "demo", "status": 200, "event_id": uuid.uuid4().hex}]
        assert usage.record_usage(s, rows) == 1
    for sql in ("SELECT * FROM models", "UPDATE api_keys SET revoked_at = now()", "DELETE FROM usage_records",
                "SELECT * FROM audit_events"):  # fmt: skip
        with pytest.raises(PermissionDenied), gw.session() as s:
            s.execute(text(sql))


# --- the attack table: every row refused, nothing changed -------------------------------------------------------


def test_forged_role_flag_does_not_move_production(team, tmp_path):
    before = team.snapshot()
    r = cli(team, "mallory", "alias", "set", "demo", "production", "2", "--role", "release_manager", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "slipway: error: demo@production is protected: moving it needs membership of database role "
        "'release_manager' or an approval of version:demo:2 by one (connected as 'mallory'); nothing was changed"
    ]
    assert team.snapshot() == before


def test_forged_slipway_actor_does_not_move_production(team, tmp_path):
    before = team.snapshot()
    r = cli(team, "mallory", "alias", "set", "demo", "production", "2", actor="dave", cwd=tmp_path)
    assert r.returncode == 2
    assert "needs membership of database role 'release_manager'" in r.stderr
    assert "connected as 'mallory'" in r.stderr
    assert team.snapshot() == before
    # what mallory may do, she does as herself: the label only sits beside her name
    assert cli(team, "mallory", "alias", "set", "demo", "staging", "2", actor="dave", cwd=tmp_path).returncode == 0
    last = json.loads(cli(team, "mallory", "audit", "list", "--json", "--limit", "1", cwd=tmp_path).stdout)[0]
    assert (last["actor"], last["via"], last["target"]) == ("mallory", "dave", "alias:demo@staging")


def test_the_requester_cannot_approve_their_own_version(team):
    before = team.snapshot()
    with pytest.raises(PermissionDenied, match=r"^'ana' requested version:demo:2: the requester cannot approve it"):
        with team.reg("ana", label="erin").session() as s:
            catalog.record_approval(s, subject="version:demo:2")
    assert team.snapshot() == before


def test_the_requester_cannot_approve_their_own_version_by_sql_under_another_name(team):
    before = team.snapshot()
    with pytest.raises(PermissionDenied, match="ana requested version:demo:2: the requester cannot approve it"):
        with team.reg("ana").session() as s:
            s.execute(text("INSERT INTO approvals (subject, approver, decision, comment, created_at) "
                           "VALUES ('version:demo:2', 'erin', 'approved', '', now())"))  # fmt: skip
    assert team.snapshot() == before


def test_the_same_person_approving_twice_is_one_approver(team):
    with team.reg("erin").session() as s:
        catalog.record_approval(s, subject="version:demo:2")
    before = team.snapshot()
    with pytest.raises(AlreadyExists, match=r"^'erin' already approved version:demo:2 \(approval \d+\): distinct"):
        with team.reg("erin", label="dave").session() as s:  # another name, the same login
            catalog.record_approval(s, subject="version:demo:2")
    with pytest.raises(AlreadyExists), team.reg("erin").session() as s:  # around the check, straight to the table
        s.execute(text("INSERT INTO approvals (subject, approver, decision, comment, created_at) "
                       "VALUES ('version:demo:2', 'someone-else', 'approved', '', now())"))  # fmt: skip
    assert team.snapshot() == before


def test_an_approval_in_a_role_the_approver_lacks_is_refused(team):
    before = team.snapshot()
    with pytest.raises(PermissionDenied, match="approving in role release_manager needs membership of role"):
        with team.reg("bob").session() as s:
            catalog.record_approval(s, subject="version:demo:2", role="release_manager")
    assert team.snapshot() == before


def test_an_approval_by_a_non_member_does_not_move_production(team):
    with team.reg("bob").session() as s:
        appr = catalog.record_approval(s, subject="version:demo:2")
    before = team.snapshot()
    with pytest.raises(ProtectedAlias, match="needs membership of database role 'release_manager'"):
        with team.reg("ana").session() as s:
            catalog.set_alias(s, model="demo", alias="production", version=2, approval_id=appr.id)
    assert team.snapshot() == before


def test_unprotecting_needs_the_admin_role(team, tmp_path):
    before = team.snapshot()
    r = cli(team, "mallory", "alias", "protect", "demo", "production", "--off", actor="carol", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "slipway: error: changing the protection of demo@production needs role slipway_admin "
        "(connected as 'mallory'); nothing was changed"
    ]
    assert team.snapshot() == before


def test_protecting_with_a_missing_role_needs_someone_who_may_create_it(team):
    before = team.snapshot()
    with pytest.raises(PermissionDenied, match=r"database role 'auditors' does not exist .* CREATE ROLE auditors"):
        with team.reg("carol").session() as s:
            catalog.protect_alias(s, model="demo", alias="staging", required_role="auditors")
    assert team.snapshot() == before
    with team.reg(OWNER).session() as s:  # the owner may create roles: the protection names a real role
        catalog.protect_alias(s, model="demo", alias="staging", required_role="auditors")
    with team.reg(OWNER).engine.connect() as c:
        assert c.execute(text("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'auditors'")).scalar_one() is False


DIRECT_WRITES = [
    ("UPDATE aliases SET version_id = (SELECT max(id) FROM model_versions)", "table aliases"),
    ("DELETE FROM aliases", "table aliases"),
    ("INSERT INTO aliases (model_id, name, version_id, protected, updated_by, updated_at) "
     "SELECT model_id, 'sneaky', id, false, 'x', now() FROM model_versions LIMIT 1", "table aliases"),
    ("UPDATE model_versions SET dataset_digest = 'sha256:forged'", "table model_versions"),
    ("UPDATE model_versions SET created_by = 'erin'", "table model_versions"),
    ("DELETE FROM model_versions", "table model_versions"),
    ("UPDATE approvals SET decision = 'approved'", "table approvals"),
    ("DELETE FROM approvals", "table approvals"),
    ("UPDATE gate_decisions SET outcome = 'passed'", "table gate_decisions"),
    ("UPDATE audit_events SET actor = 'erin'", "table audit_events"),
    ("DELETE FROM audit_events", "table audit_events"),
    ("TRUNCATE audit_events CASCADE", "table audit_events"),
    ("SELECT slipway_protect_alias(id, false, NULL) FROM aliases", "slipway_admin"),
    ("SELECT slipway_move_alias(model_id, 'production', (SELECT max(id) FROM model_versions), false, NULL, NULL) "
     "FROM aliases WHERE name = 'production'", "protected"),
]  # fmt: skip


def _id(sql: str) -> str:
    words = sql.replace("(", " ").split()
    if words[0] == "SELECT":
        return f"call-{words[1]}"
    table = words[words.index("FROM") + 1] if "FROM" in words[:3] else words[2] if words[1] == "INTO" else words[1]
    return f"{words[0].lower()}-{table}" + ("-" + words[3] if words[0] == "UPDATE" else "")


@pytest.mark.parametrize("who", ["rita", "mallory"], ids=["reader", "operator"])
@pytest.mark.parametrize("sql, refusal", DIRECT_WRITES, ids=[_id(sql) for sql, _ in DIRECT_WRITES])
def test_direct_writes_to_aliases_versions_and_the_audit_log_are_refused(team, who, sql, refusal):
    before = team.snapshot()
    with pytest.raises(PermissionDenied) as e, team.reg(who).session() as s:
        s.execute(text(sql))
    if who == "mallory" or "slipway_" not in sql:  # a reader may not even call the functions
        assert refusal in str(e.value)
    assert f"connected as '{who}'" in str(e.value)
    assert team.snapshot() == before


@pytest.mark.parametrize(
    "who, sql",
    [
        ("mallory", "SELECT slipway_move_alias(model_id, 'staging', (SELECT max(id) FROM model_versions), false, "
                    "NULL, NULL) FROM aliases WHERE name = 'staging'"),
        ("carol", "SELECT slipway_protect_alias(id, false, NULL) FROM aliases WHERE name = 'production'"),
    ],
    ids=["move", "unprotect"],
)  # fmt: skip
def test_calling_the_alias_functions_by_hand_cannot_change_an_alias_unaudited(team, who, sql):
    before = team.snapshot()
    with pytest.raises(PermissionDenied, match=r"alias alias:demo@\w+ changed without an audit event recording it"):
        with team.reg(who).session() as s:
            s.execute(text(sql))  # allowed to call it, but the commit is refused
    assert team.snapshot() == before


def test_an_audit_event_in_someone_elses_name_is_refused(team):
    before = team.snapshot()
    with pytest.raises(PermissionDenied, match="written as the connected role mallory, not as erin"):
        with team.reg("mallory").session() as s:
            audit.append(s, action="alias.set", target="alias:demo@production", actor="erin")
    assert team.snapshot() == before


def test_a_stale_expectation_is_refused_by_the_database_too(team):
    with team.reg("dave").session() as s:
        catalog.set_alias(s, model="demo", alias="production", version=2, expected=1)
    before = team.snapshot()
    with pytest.raises(AliasConflict, match="points to version 2, not the expected 1"), team.reg("erin").session() as s:
        catalog.set_alias(s, model="demo", alias="production", version=3, expected=1)
    assert team.snapshot() == before


# --- slipway db roles ----------------------------------------------------------------------------------------------


def test_db_roles_is_idempotent_and_run_by_the_owner(team, tmp_path):
    r = cli(team, OWNER, "db", "roles", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("privileges granted on schema public; roles created: none (all existed)")
    r = cli(team, "carol", "db", "roles", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("slipway: error: `slipway db roles` must be run by the owner of the registry's tables")


def test_db_roles_on_sqlite_explains_there_are_none(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIPWAY_")} | {"SLIPWAY_HOME": str(tmp_path)}
    r = subprocess.run([*SLIPWAY, "db", "roles"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "slipway: error: SQLite has no database roles: the embedded registry is single-user and SLIPWAY_ACTOR is "
        "only a display label there; use PostgreSQL (SLIPWAY_DATABASE_URL=postgresql://...) for roles"
    ]


def test_grants_are_exact(team):
    """No role but the owner may UPDATE or DELETE audit events or write aliases; a reader writes nothing."""
    eng = create_engine(team.url(OWNER))
    with eng.connect() as c:
        rows = c.execute(text(
            "SELECT grantee, table_name, privilege_type FROM information_schema.role_table_grants "
            "WHERE table_schema = 'public' AND grantee LIKE 'slipway_%'"
        )).all()  # fmt: skip
    eng.dispose()
    grants = {(g, t, p) for g, t, p in rows}
    assert not {x for x in grants if x[1] in ("aliases", "audit_events") and x[2] in ("UPDATE", "DELETE", "TRUNCATE")}
    assert not {x for x in grants if x[1] == "aliases" and x[2] == "INSERT"}
    assert {p for g, _, p in grants if g == roles.READER} == {"SELECT"}
    assert {(t, p) for g, t, p in grants if g == roles.GATEWAY} == {
        ("api_keys", "SELECT"), ("usage_records", "SELECT"), ("usage_records", "INSERT")
    }  # fmt: skip
    assert {(t, p) for g, t, p in grants if g == roles.WORKER} == {("usage_records", "DELETE")}  # + operator's
