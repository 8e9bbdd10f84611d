"""Tables come only from Alembic; migrations round-trip and agree with the ORM on both databases."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from slipway.registry import DatabaseUnavailable, db
from slipway.registry.models import Base
from tests.conftest import make_registry


def _tables(engine):
    with engine.connect() as c:
        return set(inspect(c).get_table_names()) - {"alembic_version"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrade_downgrade_upgrade_round_trips(backend, tmp_path, request):
    reg = make_registry(backend, tmp_path, request, migrate=False)
    reg.upgrade()
    assert _tables(reg.engine) == set(Base.metadata.tables)
    db.downgrade(reg.engine, "base")
    assert _tables(reg.engine) == set()
    assert db.current_revision(reg.engine) is None
    reg.upgrade()
    assert db.current_revision(reg.engine) == db.head_revision()
    assert _tables(reg.engine) == set(Base.metadata.tables)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_autogenerate_finds_no_drift_from_the_orm(backend, tmp_path, request):
    reg = make_registry(backend, tmp_path, request)
    with reg.engine.connect() as c:
        ctx = MigrationContext.configure(c, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_unmigrated_database_is_reported_not_crashed(tmp_path, request):
    reg = make_registry("sqlite", tmp_path, request, migrate=False)
    with pytest.raises(DatabaseUnavailable, match="not initialised: run `slipway db upgrade`"):
        reg.check()
