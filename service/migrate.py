"""Schema migrations (Alembic, ``migrations/``): the only way the schema is created."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

_ROOT = Path(__file__).resolve().parents[1]


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
