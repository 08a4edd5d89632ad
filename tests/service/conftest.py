"""Service test fixtures: real PostgreSQL and Redis on this machine, the embedded SQLite default, a tiny model.

PostgreSQL: every test module that needs it gets a database of its own, created on the server at
127.0.0.1:5432 (reached through its ``test`` database), upgraded to head by the Alembic migrations and
dropped afterwards. Redis: database 15 on 127.0.0.1:6379, flushed before use. Nothing is mocked.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis

from service.db.migrate import upgrade
from service.settings import Settings

PG_ADMIN = os.environ.get("PEER_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
PG_HOST = os.environ.get("PEER_TEST_PG_HOST", "postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("PEER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

TINY_MODEL = dict(base_model="fresh", d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64,
                  peer_experts=16 * 16, peer_heads=2, peer_top_k=4, peer_d_key=16)
TINY_TRAINING = dict(train_steps=12, base_train_steps=12, train_batch_size=4, train_seq_len=32, new_experts=64,
                     eval_max_batches=2, bootstrap_corpus="", usage_flush_seconds=0.2, swap_poll_seconds=0.2,
                     job_heartbeat_seconds=0.2)


def tiny_settings(home, database_url: str | None = None, broker_url: str | None = None, **overrides) -> Settings:
    return Settings(home=home, database_url=database_url, broker_url=broker_url,
                    **{**TINY_MODEL, **TINY_TRAINING, **overrides})


def create_pg_database() -> str:
    name = f"peer_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database at the migrations' head, for one test module."""
    name = create_pg_database()
    url = f"postgresql+psycopg://{PG_HOST}/{name}"
    upgrade(url)
    try:
        yield url
    finally:
        drop_pg_database(name)


@pytest.fixture()
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()
    return REDIS_URL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ServerThread:
    """uvicorn serving an app on a free loopback port in a background thread (real HTTP, real sockets)."""

    def __init__(self, app, host: str = "127.0.0.1", **options):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning", **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        wait_for(lambda: self.server.started, 60, what="uvicorn to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def domain_text(domain: str, sentences: int = 400, seed: int = 0) -> str:
    """Synthetic two-domain text (the grammars of the library's continual-learning tests)."""
    from test_continual import CODE_GRAMMAR
    from test_train import ENGLISH_GRAMMAR, grammar_text

    return grammar_text(sentences, seed=seed, grammar={"english": ENGLISH_GRAMMAR, "code": CODE_GRAMMAR}[domain])
