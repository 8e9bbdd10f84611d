"""Every mutation writes a hash-chained audit event in its own transaction; tampering is detected."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from slipway.registry import AliasConflict, audit, catalog


def test_every_mutation_is_audited_in_order(registry):
    with registry.session(actor="ana") as s:
        catalog.create_model(s, name="demo")
        catalog.create_version(s, model="demo")
        catalog.set_alias(s, model="demo", alias="production", version=1)
    with registry.session() as s:
        events = list(reversed(audit.list_events(s)))
    # on PostgreSQL the actor is the connection's role, the label only recorded beside it
    pg = registry.engine.dialect.name == "postgresql"
    who, via = (registry.engine.url.username, "ana") if pg else ("ana", None)
    assert [(e.action, e.target, e.actor, e.via) for e in events] == [
        ("model.create", "model:demo", who, via),
        ("version.create", "version:demo:1", who, via),
        ("alias.set", "alias:demo@production", who, via),
    ]
    assert events[0].prev_hash == audit.GENESIS
    assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]


def test_a_failed_transaction_leaves_no_audit_event(registry):
    with registry.session() as s:
        catalog.create_model(s, name="demo")
        catalog.create_version(s, model="demo")
    with pytest.raises(AliasConflict), registry.session() as s:
        catalog.create_version(s, model="demo")  # rolled back with the rest
        catalog.set_alias(s, model="demo", alias="production", version=1, expected=7)
    with registry.session() as s:
        assert [e.action for e in audit.list_events(s)] == ["version.create", "model.create"]
        assert len(catalog.list_versions(s, "demo")) == 1


@pytest.mark.parametrize(
    "tamper, reason",
    [
        ("UPDATE audit_events SET actor = 'mallory' WHERE id = {id}", "row altered"),
        ("UPDATE audit_events SET after = NULL WHERE id = {id}", "row altered"),
        ("DELETE FROM audit_events WHERE id = {id}", "prev_hash does not match"),
    ],
    ids=["actor", "payload", "deleted-row"],
)
def test_tampering_with_one_row_is_detected_and_named(registry, tamper, reason):
    with registry.session() as s:
        catalog.create_model(s, name="demo")
        for _ in range(3):
            catalog.create_version(s, model="demo")
    with registry.session() as s:
        ids = [e.id for e in reversed(audit.list_events(s))]
        assert audit.verify(s) == []
    victim = ids[1]
    with registry.engine.begin() as c:
        c.execute(text(tamper.format(id=victim)))
    with registry.session() as s:
        breaks = audit.verify(s)
    assert breaks, "tampering went unnoticed"
    expected_row = victim if "UPDATE" in tamper else ids[2]
    assert breaks[0].event_id == expected_row
    assert reason in breaks[0].reason
