"""Checkpoint writes against garbage collection: a reader-writer lock over the store's chunks.

A checkpoint writer reuses every chunk that already exists, renewing its age (service/store/chunks.py), and
names it in a manifest written last; the collector deletes chunks that no manifest names and that are older
than PEER_GC_GRACE_SECONDS, reading their age again just before (service/store/retention.py). On a local store the
check and the deletion are one step (the file is moved aside first), but on an object store a writer can
renew a chunk between the collector's check and its DELETE and then publish a manifest naming a chunk that
is gone. So writers hold this lock shared from their first chunk to their manifest, and the collector holds
it exclusively from reading the manifests to its last deletion: every manifest it reads is whole, and no
chunk is reused while it deletes.

Writers hold it on to the commit of the rows that name what they wrote (:func:`store_write`: a version's
checkpoint, a corpus' text): the collector reads which checkpoints and corpora are live under the lock, so it
never takes files between their write and their row's commit. The grace period used to be all that covered
that moment, and PEER_GC_GRACE_SECONDS may be 0.

PostgreSQL: a session-level advisory lock on a connection of its own, so it holds across hosts (a lost
connection releases it). SQLite, one host by nature: ``flock`` on ``<PEER_HOME>/store.lock``.
"""
from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

if TYPE_CHECKING:  # the context holds the store: store/ names it in annotations only
    from ..context import ServiceContext

log = logging.getLogger(__name__)

STORE_LOCK = 0x50454552_53544F52  # "PEERSTOR": this lock's advisory key


@contextmanager
def store_lock(ctx: ServiceContext, exclusive: bool) -> Iterator[None]:
    """Held shared by checkpoint writers, exclusive by garbage collection (see the module's docstring)."""
    if ctx.engine.dialect.name == "postgresql":
        with _advisory_lock(ctx, exclusive):
            yield
    else:
        with _file_lock(ctx, exclusive):
            yield


@contextmanager
def _advisory_lock(ctx: ServiceContext, exclusive: bool) -> Iterator[None]:
    kind = "" if exclusive else "_shared"
    with ctx.engine.connect() as connection:
        connection.execute(text(f"SELECT pg_advisory_lock{kind}(:key)"), {"key": STORE_LOCK})
        try:
            yield
        finally:
            try:
                connection.execute(text(f"SELECT pg_advisory_unlock{kind}(:key)"), {"key": STORE_LOCK})
            except DBAPIError:  # the connection is gone, and the lock with it
                log.warning("could not release the store lock: its connection was lost (so was the lock)")


@contextmanager
def _file_lock(ctx: ServiceContext, exclusive: bool) -> Iterator[None]:
    path = ctx.settings.home / "store.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def store_write(ctx: ServiceContext, session: Session | None = None) -> Iterator[None]:
    """Held (shared) by whatever writes store files, from its first write to the commit of the rows that name
    them: how the service writes every checkpoint and corpus; commit inside the block. Given the ``session``
    whose transaction commits the rows, on PostgreSQL the lock is that transaction's own
    (``pg_advisory_xact_lock_shared``, released by its commit or rollback): a request takes no second
    connection from the pool for it (30 requests at once would wait for each other's)."""
    if session is not None and ctx.engine.dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": STORE_LOCK})
        yield
        return
    with store_lock(ctx, exclusive=False):
        yield
