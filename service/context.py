"""What every process of the service shares: settings, the database and the store."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from .db.session import make_engine, make_session_factory
from .settings import Settings
from .store.store import Store


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: Store
    stopping: threading.Event = field(default_factory=threading.Event)  # set: the worker is shutting down

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "ServiceContext":
        settings = settings or Settings()
        engine = make_engine(settings.resolved_database_url)
        store = Store(settings.store_root, settings.chunk_bytes, settings.store_options, settings.store_concurrency)
        return cls(settings, engine, make_session_factory(engine), store)

    def close(self) -> None:
        self.engine.dispose()
