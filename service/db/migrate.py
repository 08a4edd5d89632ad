"""Schema migrations (Alembic, ``migrations/``): the only way the schema is created."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

_ROOT = Path(__file__).resolve().parents[2]  # what holds service/ (service/db/migrate.py)


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url``; ``migrations/`` is found beside the package (a checkout or the
    image's /app) or in the working directory."""
    for base in (_ROOT, Path.cwd()):
        if (base / "migrations" / "env.py").exists():
            break
    else:
        raise FileNotFoundError("migrations/ not found beside the service package nor in the working directory")
    config = Config()
    config.set_main_option("script_location", str(base / "migrations"))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def schema_problem(url: str) -> str | None:
    """Why this code cannot run on the database at ``url`` (its schema is missing or at another revision than
    the migrations' head), or None when it can."""
    config = alembic_config(url)
    script = ScriptDirectory.from_config(config)
    heads = set(script.get_heads())
    from .session import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()
    if current == heads:
        return None
    if not current:
        return "the database has no schema yet: run `peer-service migrate` first"
    known = {revision.revision for revision in script.walk_revisions()}
    if not current <= known:
        return (f"the database schema is at revision {', '.join(sorted(current))}, which this code does not know "
                f"(a newer release migrated it); run the release that did")
    return (f"the database schema is at revision {', '.join(sorted(current))} and this code needs "
            f"{', '.join(sorted(heads))}: run `peer-service migrate`")
