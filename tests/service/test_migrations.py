"""The schema comes from the Alembic migrations only: they must build exactly what the models describe,
on PostgreSQL and on the embedded SQLite, and downgrade cleanly."""
from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.db.migrate import downgrade, schema_problem, upgrade
from service.db.models import Base
from service.db.session import make_engine

from .conftest import PG_HOST, create_pg_database, drop_pg_database


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'peer.db'}"
        return
    name = create_pg_database()
    try:
        yield f"postgresql+psycopg://{PG_HOST}/{name}"
    finally:
        drop_pg_database(name)


def test_upgrade_builds_the_models_schema_and_downgrade_removes_it(empty_database_url):
    upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
            tables = set(inspect(connection).get_table_names())
        assert diff == []
        assert set(Base.metadata.tables) <= tables
        assert "alembic_version" in tables
        downgrade(empty_database_url, "base")
        with engine.connect() as connection:
            assert set(inspect(connection).get_table_names()) <= {"alembic_version"}
        upgrade(empty_database_url)  # and back up: the migration is repeatable
    finally:
        engine.dispose()


def test_api_and_worker_refuse_a_database_that_is_not_at_this_codes_schema(empty_database_url, tmp_path, monkeypatch,
                                                                          capsys):
    """Started before `peer-service migrate` (or after an upgrade of the code), api and worker say what to run
    instead of failing on a missing table mid-request."""
    from service.cli import main

    assert "no schema yet" in schema_problem(empty_database_url)
    upgrade(empty_database_url)
    assert schema_problem(empty_database_url) is None
    downgrade(empty_database_url, "-1")
    assert "run `peer-service migrate`" in schema_problem(empty_database_url)
    monkeypatch.setenv("PEER_HOME", str(tmp_path))
    monkeypatch.setenv("PEER_DATABASE_URL", empty_database_url)
    for command in ("api", "worker"):
        with pytest.raises(SystemExit) as refused:
            main(["--log-level", "WARNING", command])
        assert refused.value.code == 2 and "run `peer-service migrate`" in capsys.readouterr().err, command
