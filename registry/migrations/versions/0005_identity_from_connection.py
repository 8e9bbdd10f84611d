"""Who may do what: the actor is the connection's role on PostgreSQL, aliases move only through a checked function.

Both databases: ``audit_events.via`` (what the caller said it acts for — a Prefect flow run, an API key, the label
``SLIPWAY_ACTOR`` gives — kept beside the actor, hashed with it) and one approval per approver and subject.

PostgreSQL only (SQLite has no roles; there ``SLIPWAY_ACTOR`` is a display label):

- ``slipway_is_member(role)``: whether ``session_user`` is, directly or through other roles, a member of ``role``
  (what ``pg_has_role(session_user, role, 'MEMBER')`` answers, except that a superuser is not taken to be a member
  of every role: protection binds the owner's sessions too);
- triggers that stamp ``session_user`` into who-columns (versions, runs, rollouts, keys, cost reports, approvals)
  and refuse an audit event whose actor is not ``session_user``; the approval trigger also refuses the requester
  approving their own request and an approval "in a role" the approver is not a member of;
- ``slipway_move_alias`` and ``slipway_protect_alias``: SECURITY DEFINER functions, the only way a role other than
  the owner changes ``aliases`` (``slipway db roles`` grants EXECUTE, never INSERT/UPDATE/DELETE on the table).
  They check compare-and-set, protection (membership of the alias's role, or an approval of the version by a
  member of it) and, for protection changes, membership of ``slipway_admin``; each stamps ``aliases.audit_mark``
  (the last audit event before the change), and a deferred constraint trigger refuses to commit an alias change
  that no later audit event records: calling the functions by hand does not move an alias unaudited.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 00:45:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Tables whose who-column is stamped with session_user on insert, and that column.
STAMPED = {
    "model_versions": "created_by",
    "pipeline_runs": "actor",
    "rollout_events": "actor",
    "api_keys": "created_by",
    "cost_reports": "created_by",
}

MEMBER_FN = """
CREATE FUNCTION slipway_is_member(p_role text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH RECURSIVE m(oid) AS (
    SELECT oid FROM pg_roles WHERE rolname = session_user
    UNION SELECT am.roleid FROM pg_auth_members am JOIN m ON am.member = m.oid
  )
  SELECT EXISTS (SELECT 1 FROM m JOIN pg_roles r ON r.oid = m.oid WHERE r.rolname = p_role)
$$
"""

# The requester of an approval's subject: who registered the version, or who started the run.
REQUESTER_FN = """
CREATE FUNCTION slipway_requester(p_subject text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = {schema}, pg_temp AS $$
DECLARE kind text := split_part(p_subject, ':', 1); rest text := substr(p_subject, length(kind) + 2);
BEGIN
  IF kind = 'version' THEN
    RETURN (SELECT v.created_by FROM model_versions v JOIN models m ON m.id = v.model_id
            WHERE m.name = split_part(rest, ':', 1) AND v.version::text = split_part(rest, ':', 2));
  ELSIF kind = 'run' THEN
    RETURN (SELECT r.actor FROM pipeline_runs r WHERE r.id = split_part(rest, '/', 1));
  ELSIF kind = 'gate' AND rest ~ '^[0-9]+$' THEN
    RETURN (SELECT coalesce(r.actor, v.created_by) FROM gate_decisions g
            JOIN model_versions v ON v.id = g.version_id LEFT JOIN pipeline_runs r ON r.id = g.pipeline_run_id
            WHERE g.id = rest::integer);
  END IF;
  RETURN NULL;
END $$
"""

STAMP_FN = """
CREATE FUNCTION slipway_stamp_session_user() RETURNS trigger LANGUAGE plpgsql
SET search_path = {schema}, pg_temp AS $$
BEGIN
  IF TG_ARGV[0] = 'actor' THEN NEW.actor := session_user; ELSE NEW.created_by := session_user; END IF;
  RETURN NEW;
END $$
"""

AUDIT_FN = """
CREATE FUNCTION slipway_audit_actor_check() RETURNS trigger LANGUAGE plpgsql
SET search_path = {schema}, pg_temp AS $$
BEGIN
  IF NEW.actor IS DISTINCT FROM session_user::text THEN
    RAISE EXCEPTION 'an audit event is written as the connected role %, not as %', session_user, NEW.actor
      USING ERRCODE = '42501';
  END IF;
  RETURN NEW;
END $$
"""

APPROVAL_FN = """
CREATE FUNCTION slipway_approval_check() RETURNS trigger LANGUAGE plpgsql
SET search_path = {schema}, pg_temp AS $$
BEGIN
  NEW.approver := session_user;
  IF slipway_requester(NEW.subject) = session_user::text THEN
    RAISE EXCEPTION '% requested %: the requester cannot approve it', session_user, NEW.subject
      USING ERRCODE = '42501';
  END IF;
  IF NEW.role IS NOT NULL AND NOT slipway_is_member(NEW.role) THEN
    RAISE EXCEPTION 'approving in role % needs membership of role %', NEW.role, NEW.role USING ERRCODE = '42501';
  END IF;
  RETURN NEW;
END $$
"""

MOVE_FN = """
CREATE FUNCTION slipway_move_alias(p_model_id integer, p_name text, p_version_id integer,
                                   p_check_expected boolean, p_expected_version_id integer, p_approval_id integer)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = {schema}, pg_temp AS $$
DECLARE
  a aliases%ROWTYPE;
  ap approvals%ROWTYPE;
  subj text;
  ok boolean := false;
  mark bigint;
BEGIN
  PERFORM pg_advisory_xact_lock({lock});  -- the audit chain's lock: no event can slip in before the mark
  mark := (SELECT coalesce(max(id), 0) FROM audit_events);
  SELECT * INTO a FROM aliases WHERE model_id = p_model_id AND name = p_name FOR UPDATE;
  IF NOT FOUND THEN
    IF p_check_expected AND p_expected_version_id IS NOT NULL THEN
      RAISE EXCEPTION 'alias % does not exist', p_name USING ERRCODE = 'SW409';
    END IF;
    INSERT INTO aliases (model_id, name, version_id, protected, updated_by, updated_at, audit_mark)
      VALUES (p_model_id, p_name, p_version_id, false, session_user, now(), mark) RETURNING id INTO a.id;
    RETURN a.id;
  END IF;
  IF p_check_expected AND a.version_id IS DISTINCT FROM p_expected_version_id THEN
    RAISE EXCEPTION 'alias % moved concurrently', p_name USING ERRCODE = 'SW409';
  END IF;
  IF a.protected THEN
    ok := a.required_role IS NOT NULL AND slipway_is_member(a.required_role);
    IF NOT ok AND p_approval_id IS NOT NULL THEN
      SELECT 'version:' || m.name || ':' || v.version INTO subj
        FROM model_versions v JOIN models m ON m.id = v.model_id WHERE v.id = p_version_id;
      SELECT * INTO ap FROM approvals WHERE id = p_approval_id;
      ok := FOUND AND ap.subject = subj AND ap.decision = 'approved'
            AND ap.approver IS DISTINCT FROM slipway_requester(subj)
            AND (a.required_role IS NULL OR pg_has_role(ap.approver, a.required_role, 'MEMBER'));
    END IF;
    IF NOT ok THEN
      RAISE EXCEPTION 'alias % is protected: moving it needs membership of role % or an approval of the version',
        p_name, coalesce(a.required_role, '(none)') USING ERRCODE = '42501';
    END IF;
  END IF;
  UPDATE aliases SET version_id = p_version_id, updated_by = session_user, updated_at = now(), audit_mark = mark
    WHERE id = a.id;
  RETURN a.id;
END $$
"""

PROTECT_FN = """
CREATE FUNCTION slipway_protect_alias(p_alias_id integer, p_protected boolean, p_required_role text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = {schema}, pg_temp AS $$
BEGIN
  -- inside a SECURITY DEFINER function current_user is its owner: the owner may, and members of slipway_admin
  IF session_user::text <> current_user::text AND NOT slipway_is_member('slipway_admin') THEN
    RAISE EXCEPTION 'changing the protection of an alias needs membership of role slipway_admin'
      USING ERRCODE = '42501';
  END IF;
  IF p_required_role IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_required_role) THEN
    RAISE EXCEPTION 'role % does not exist', p_required_role USING ERRCODE = '42704';
  END IF;
  PERFORM pg_advisory_xact_lock({lock});
  UPDATE aliases SET protected = p_protected, required_role = p_required_role,
                     audit_mark = (SELECT coalesce(max(id), 0) FROM audit_events)
    WHERE id = p_alias_id;
END $$
"""

# Checked at commit: an alias changed in this transaction has an audit event after its mark.
AUDITED_FN = """
CREATE FUNCTION slipway_alias_audited() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {schema}, pg_temp AS $$
DECLARE t text := 'alias:' || (SELECT name FROM models WHERE id = NEW.model_id) || '@' || NEW.name;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM audit_events e WHERE e.target = t AND e.id > coalesce(NEW.audit_mark, 0)
                 AND e.action IN ('alias.set', 'alias.protect')) THEN
    RAISE EXCEPTION 'alias % changed without an audit event recording it', t USING ERRCODE = '42501';
  END IF;
  RETURN NULL;
END $$
"""
# The audit chain's advisory lock (slipway.registry.audit._PG_AUDIT_LOCK, copied: migrations import no live code).
AUDIT_LOCK = 0x5C1E_A0D1

FUNCTIONS = (
    "slipway_move_alias(integer, text, integer, boolean, integer, integer)",
    "slipway_protect_alias(integer, boolean, text)",
    "slipway_alias_audited()",
    "slipway_approval_check()",
    "slipway_audit_actor_check()",
    "slipway_stamp_session_user()",
    "slipway_requester(text)",
    "slipway_is_member(text)",
)


def _raw(sql: str) -> None:
    """DDL straight to psycopg, in the migration's transaction: no parameters, so the '%' of RAISE formats and the
    ':' of subjects reach PostgreSQL as written."""
    op.get_bind().connection.driver_connection.execute(sql)  # type: ignore[union-attr]


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("via", sa.String(length=200), nullable=True))
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.create_unique_constraint(batch_op.f("uq_approvals_subject_approver"), ["subject", "approver"])
    with op.batch_alter_table("aliases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("audit_mark", sa.BigInteger(), nullable=True))
    if op.get_bind().dialect.name != "postgresql":
        return
    run = _raw
    # Pinned, so a SECURITY DEFINER function never resolves a table through a schema the caller controls.
    schema = op.get_bind().exec_driver_sql("SELECT quote_ident(current_schema())").scalar()
    for ddl in (MEMBER_FN, REQUESTER_FN, STAMP_FN, AUDIT_FN, APPROVAL_FN, MOVE_FN, PROTECT_FN, AUDITED_FN):
        run(ddl.replace("{schema}", str(schema)).replace("{lock}", str(AUDIT_LOCK)))
    for fn in FUNCTIONS[:2]:
        run(f"REVOKE EXECUTE ON FUNCTION {fn} FROM PUBLIC")  # `slipway db roles` grants them
    for table, column in STAMPED.items():
        run(
            f"CREATE TRIGGER slipway_stamp_{table} BEFORE INSERT ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION slipway_stamp_session_user('{column}')"
        )
    run(
        "CREATE TRIGGER slipway_audit_actor BEFORE INSERT ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION slipway_audit_actor_check()"
    )
    run(
        "CREATE TRIGGER slipway_approval BEFORE INSERT ON approvals FOR EACH ROW EXECUTE FUNCTION slipway_approval_check()"
    )
    run(
        "CREATE CONSTRAINT TRIGGER slipway_alias_audited AFTER INSERT OR UPDATE ON aliases "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slipway_alias_audited()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        run = _raw
        run("DROP TRIGGER slipway_alias_audited ON aliases")
        run("DROP TRIGGER slipway_approval ON approvals")
        run("DROP TRIGGER slipway_audit_actor ON audit_events")
        for table in STAMPED:
            run(f"DROP TRIGGER slipway_stamp_{table} ON {table}")
        for fn in FUNCTIONS:
            run(f"DROP FUNCTION {fn}")
    with op.batch_alter_table("aliases", schema=None) as batch_op:
        batch_op.drop_column("audit_mark")
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_approvals_subject_approver"), type_="unique")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_column("via")
