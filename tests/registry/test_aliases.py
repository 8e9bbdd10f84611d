"""Aliases move compare-and-set; protected aliases need an approval or a role."""

from __future__ import annotations

import threading

import pytest

from slipway.registry import AliasConflict, ProtectedAlias, audit, catalog


def _setup(reg, versions=3):
    with reg.session() as s:
        catalog.create_model(s, name="demo")
        for _ in range(versions):
            catalog.create_version(s, model="demo")
        catalog.set_alias(s, model="demo", alias="production", version=1, expected=None)


def _alias_version(reg, alias="production"):
    with reg.session() as s:
        return catalog.get_alias(s, "demo", alias).version.version


def _audit_count(reg, action="alias.set"):
    with reg.session() as s:
        return len(audit.list_events(s, action=action, limit=10_000))


def test_alias_move_with_the_current_expectation_succeeds_and_is_audited(registry):
    _setup(registry)
    with registry.session(actor="ana") as s:
        catalog.set_alias(s, model="demo", alias="production", version=2, expected=1)
    assert _alias_version(registry) == 2
    with registry.session() as s:
        last = audit.list_events(s, action="alias.set", limit=1)[0]
    # the label is the actor on SQLite; on PostgreSQL the actor is the connection's role and the label sits beside it
    pg = registry.engine.dialect.name == "postgresql"
    assert (last.actor, last.via) == ((registry.engine.url.username, "ana") if pg else ("ana", None))
    assert (last.target, last.before, last.after["version"]) == (
        "alias:demo@production",
        {"version": 1},
        2,
    )


def test_alias_move_conflicts_when_expected_version_is_stale(registry):
    _setup(registry)
    before = _audit_count(registry)
    with pytest.raises(AliasConflict, match="points to version 1, not the expected 2; nothing was changed"):
        with registry.session() as s:
            catalog.set_alias(s, model="demo", alias="production", version=3, expected=2)
    assert _alias_version(registry) == 1
    assert _audit_count(registry) == before


def test_creating_an_alias_that_exists_with_expected_none_conflicts(registry):
    _setup(registry)
    with pytest.raises(AliasConflict, match="already exists"), registry.session() as s:
        catalog.set_alias(s, model="demo", alias="production", version=2, expected=None)


def test_protected_alias_on_sqlite_needs_an_approval_of_that_version_or_the_role_label(sqlite_registry):
    """SQLite is single-user: the role is a label compared as a string (PostgreSQL: tests/registry/test_roles.py)."""
    registry = sqlite_registry
    _setup(registry)
    with registry.session() as s:
        catalog.protect_alias(s, model="demo", alias="production", required_role="release-manager")
    with pytest.raises(ProtectedAlias, match="needs role 'release-manager' or an approval of version:demo:2"):
        with registry.session() as s:
            catalog.set_alias(s, model="demo", alias="production", version=2, expected=1)
    with registry.session(actor="boss") as s:
        wrong = catalog.record_approval(s, subject="version:demo:3", role="release-manager")
        right = catalog.record_approval(s, subject="version:demo:2", role="release-manager")
    with pytest.raises(ProtectedAlias, match="is not an approval of version:demo:2"), registry.session() as s:
        catalog.set_alias(s, model="demo", alias="production", version=2, approval_id=wrong.id)
    assert _alias_version(registry) == 1
    with registry.session() as s:
        catalog.set_alias(s, model="demo", alias="production", version=2, expected=1, approval_id=right.id)
    with registry.session() as s:
        catalog.set_alias(s, model="demo", alias="production", version=3, expected=2, role="release-manager")
    assert _alias_version(registry) == 3


def _race(reg, n, target_for_thread):
    barrier = threading.Barrier(n)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(i):
        barrier.wait()
        try:
            target_for_thread(i)
            result = "won"
        except AliasConflict:
            result = "conflict"
        except Exception as e:  # anything else is a failure of the semantics under test
            result = f"error: {type(e).__name__}: {e}"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


def test_eight_racing_moves_from_v1_exactly_one_wins(registry):
    _setup(registry, versions=9)
    moves_before = _audit_count(registry)

    def move(i):
        with registry.session(actor=f"racer-{i}") as s:
            catalog.set_alias(s, model="demo", alias="production", version=i + 2, expected=1)

    outcomes = _race(registry, 8, move)
    assert sorted(outcomes) == ["conflict"] * 7 + ["won"], outcomes
    assert _audit_count(registry) == moves_before + 1
    with registry.session() as s:
        assert audit.verify(s) == []
    assert _alias_version(registry) in range(2, 10)
