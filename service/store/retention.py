"""The data lifecycle: deleting versions and corpora, pinning, the retention policy, garbage collection.

- A version is deleted by marking its row (``deleted_at``: lineage, evaluations, activations and usage
  still refer to it) and removing its checkpoint directory; it can no longer be activated, pinned or
  trained from. Refused (409, with the reason) while it is active, pinned, or needed by a queued or
  running job (its base, or its result).
- A corpus is deleted by marking its row (state ``deleted``), removing its files and the stream documents
  it was made of; refused while a queued or running job uses it. Versions trained on it keep what they
  learnt; later jobs replay the parent's own samples in place of its text (service/jobs/train.py).
- Retention (:func:`apply_retention`, after each publish and in the worker's housekeeping) deletes every
  version but the active one, the pinned ones, the newest PEER_KEEP_VERSIONS and those jobs need.
- Garbage collection (:func:`collect_garbage`): checkpoint directories no live version row refers to (a
  failed or cancelled job's, an attempt that lost its lease, a deletion interrupted before its files
  went), chunks no manifest refers to, corpus directories of deleted corpora, probe directories of no probe row
  (an upload whose commit failed) and temporary files, each
  only once older than PEER_GC_GRACE_SECONDS, so that nothing still being written (an attempt about to
  publish, a chunk about to be referenced) is ever collected.

The database decides (every check and mark is one conditional UPDATE inside the transaction, which
locks the row on PostgreSQL and takes the write lock on SQLite); files go only after the commit, and
anything a crash leaves behind is garbage for the next collection.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select, update

from ..db.models import Activation, Corpus, Job, PoolVersion, Probe, StreamDocument, utcnow
from ..db.session import transaction
from ..errors import Conflict, NotFound
from .lock import store_lock
from .store import Store
from .versions import active_version_id, get_version, live_version, lock_activations

if TYPE_CHECKING:  # the context holds the store: store/ names it in annotations only
    from ..context import ServiceContext

log = logging.getLogger(__name__)

LIVE_JOB_STATES = ("queued", "running", "cancelling")


# ---- what must stay ------------------------------------------------------------------------------------


def _live_jobs(session) -> list[Job]:
    return session.scalars(select(Job).where(Job.state.in_(LIVE_JOB_STATES)).order_by(Job.id)).all()


def versions_jobs_need(session) -> dict[int, list[int]]:
    """{version id: ids of the queued or running jobs that train from it or published it}; a running job
    that was not given a base records the version it trains from in its metrics."""
    needed: dict[int, list[int]] = {}
    for job in _live_jobs(session):
        for version_id in {job.base_version_id, job.result_version_id, (job.metrics or {}).get("base_version_id")}:
            if isinstance(version_id, int):
                needed.setdefault(version_id, []).append(job.id)
    return needed


def why_kept(session, version: PoolVersion) -> str | None:
    """Why ``version`` cannot be deleted now, or None."""
    if version.pinned:
        return f"it is pinned (unpin it first: POST /v1/versions/{version.id}/unpin)"
    if active_version_id(session) == version.id:
        return "it is the active version (activate another one first)"
    jobs = versions_jobs_need(session).get(version.id)
    if jobs:
        return f"queued or running jobs {jobs} need it"
    return None


# ---- deleting and pinning ------------------------------------------------------------------------------


def delete_version(ctx: ServiceContext, version_id: int) -> PoolVersion:
    """Mark the version deleted and remove its checkpoint; 409 with the reason when it must stay. Deleting
    a deleted version changes nothing."""
    with transaction(ctx.sessions) as session:
        version = get_version(session, version_id)
        lock_activations(session)  # before the row lock, in the order activations take them
        marked = session.execute(update(PoolVersion).where(PoolVersion.id == version_id,
                                                           PoolVersion.deleted_at.is_(None))
                                 .values(deleted_at=utcnow())).rowcount
        session.refresh(version)
        if marked:
            reason = why_kept(session, version)
            if reason:
                raise Conflict(f"version {version_id} cannot be deleted: {reason}")
    if marked:
        ctx.store.remove(version.checkpoint)
        log.info("deleted version %s (%s)", version_id, version.checkpoint)
    return version


def set_pinned(ctx: ServiceContext, version_id: int, pinned: bool) -> PoolVersion:
    """Pin (kept by the retention policy, refused by DELETE) or unpin a version; a deleted one cannot be pinned."""
    with transaction(ctx.sessions) as session:
        version = live_version(session, version_id, "pinned") if pinned else get_version(session, version_id)
        version.pinned = pinned
    return version


def delete_corpus(ctx: ServiceContext, corpus_id: int) -> Corpus:
    """Mark the corpus deleted, drop the stream documents it was made of and remove its files; 409 while a
    queued or running job uses it. Deleting a deleted corpus changes nothing."""
    with transaction(ctx.sessions) as session:
        corpus = session.get(Corpus, corpus_id)
        if corpus is None:
            raise NotFound(f"corpus {corpus_id} not found")
        marked = session.execute(update(Corpus).where(Corpus.id == corpus_id, Corpus.deleted_at.is_(None))
                                 .values(deleted_at=utcnow(), state="deleted")).rowcount
        if marked:
            jobs = [job.id for job in _live_jobs(session) if corpus_id in job.corpus_ids]
            if jobs:
                raise Conflict(f"corpus {corpus_id} cannot be deleted: queued or running jobs {jobs} use it "
                               f"(cancel them first: POST /v1/jobs/{{id}}/cancel)")
            session.execute(delete(StreamDocument).where(StreamDocument.corpus_id == corpus_id))
        session.refresh(corpus)
    if marked:
        ctx.store.remove_corpus(corpus_id)
        log.info("deleted corpus %s", corpus_id)
    return corpus


def delete_probe(ctx: ServiceContext, probe_id: int) -> Probe:
    """Delete the probe (its row and its file); 404 when there is none, 409 while a queued or running job names it.
    The scores versions recorded on it stay with them (GET /v1/versions: its id and name)."""
    with transaction(ctx.sessions) as session:
        probe = session.get(Probe, probe_id)
        if probe is None:
            raise NotFound(f"probe {probe_id} not found")
        session.expunge(probe)  # what the answer shows, kept past the commit that deletes its row
        session.execute(delete(Probe).where(Probe.id == probe_id))  # holds the row until the check below commits
        jobs = [job.id for job in _live_jobs(session) if job.options.get("probe") == probe_id]
        if jobs:
            raise Conflict(f"probe {probe_id} cannot be deleted: queued or running jobs {jobs} name it "
                           f"(cancel them first: POST /v1/jobs/{{id}}/cancel)")
    ctx.store.remove_probe(probe_id)
    log.info("deleted probe %s", probe_id)
    return probe


# ---- retention -----------------------------------------------------------------------------------------


def retention_candidates(session, keep_versions: int) -> list[int]:
    """Live versions the policy would delete: all but the active one, the pinned ones, the newest
    ``keep_versions``, the ``keep_versions`` most recently active ones (the rollback targets: versions nobody
    activated, e.g. a train key's jobs that did not pass their gate, cannot push them out) and those queued
    or running jobs need; oldest first."""
    versions = session.scalars(select(PoolVersion).where(PoolVersion.deleted_at.is_(None))
                               .order_by(PoolVersion.id.desc())).all()
    keep = {v.id for v in versions[:keep_versions]} | {v.id for v in versions if v.pinned}
    keep |= set(session.scalars(select(Activation.version_id).group_by(Activation.version_id)
                                .order_by(func.max(Activation.id).desc()).limit(keep_versions)))
    keep |= {active_version_id(session)} | set(versions_jobs_need(session))
    return sorted(v.id for v in versions if v.id not in keep)


def apply_retention(ctx: ServiceContext, dry_run: bool = False) -> list[int]:
    """Delete the versions the policy does not keep (PEER_KEEP_VERSIONS); returns their ids (with
    ``dry_run``: the ids it would delete). A version that became needed meanwhile is skipped."""
    with ctx.sessions() as session:
        candidates = retention_candidates(session, ctx.settings.keep_versions)
    if dry_run:
        return candidates
    deleted = []
    for version_id in candidates:
        try:
            delete_version(ctx, version_id)
            deleted.append(version_id)
        except Conflict as exc:
            log.info("retention skips version %s: %s", version_id, exc.message)
    return deleted


# ---- garbage collection --------------------------------------------------------------------------------


@dataclass
class Garbage:
    """What a collection removed (or, dry, would remove): store keys and their bytes."""

    paths: list[str] = field(default_factory=list)
    bytes: int = 0

    def add(self, store: Store, key: str) -> None:
        self.paths.append(key)
        self.bytes += store.files.size(key)


def collect_garbage(ctx: ServiceContext, dry_run: bool = False) -> Garbage:
    """Remove what nothing refers to and is older than PEER_GC_GRACE_SECONDS: checkpoint directories of
    no live version (and leftover temporary or backup ones), chunks no remaining manifest names,
    directories of deleted or unknown corpora and of unknown probes, and temporary files. ``dry_run``: only report
    them. The store is walked through its files (service/store/files.py): a local directory or an object store."""
    with nullcontext() if dry_run else store_lock(ctx, exclusive=True):  # no checkpoint is written meanwhile
        return _collect_garbage(ctx, dry_run)


def _collect_garbage(ctx: ServiceContext, dry_run: bool) -> Garbage:
    store, cutoff = ctx.store, time.time() - ctx.settings.gc_grace_seconds
    files = store.files
    with ctx.sessions() as session:
        live_keys = set(session.scalars(select(PoolVersion.checkpoint).where(PoolVersion.deleted_at.is_(None))))
        live_corpora = {str(i) for i in session.scalars(select(Corpus.id).where(Corpus.deleted_at.is_(None)))}
        live_probes = {str(i) for i in session.scalars(select(Probe.id))}  # an upload whose commit failed left none
    garbage = Garbage()

    kept_checkpoints = []
    for name in files.children("versions"):
        key = f"versions/{name}"
        if name.startswith(".") and name.endswith(".old"):  # a backup: the checkpoint itself if a swap crashed
            target = f"versions/{name[1:-4]}"
            unreferenced = target not in live_keys or store.has(target)
        else:
            unreferenced = name.startswith(".") or key not in live_keys
        if unreferenced and files.age(key) < cutoff:
            garbage.add(store, key)
        else:
            kept_checkpoints.append(key)

    referenced = set().union(*(store.checkpoint_chunks(key) for key in kept_checkpoints))
    for prefix in files.children("chunks"):
        for name, mtime in files.file_ages(f"chunks/{prefix}").items():
            if name not in referenced and mtime < cutoff:
                garbage.add(store, f"chunks/{prefix}/{name}")

    for top, live in (("corpora", live_corpora), ("probes", live_probes)):
        for name in files.children(top):
            folder = f"{top}/{name}"
            if name not in live and files.age(folder) < cutoff:
                garbage.add(store, folder)
            else:
                for stale in files.children(folder):
                    if stale.startswith(".") and stale.endswith(".tmp") and files.age(f"{folder}/{stale}") < cutoff:
                        garbage.add(store, f"{folder}/{stale}")

    if not dry_run:
        for key in garbage.paths:
            if key.startswith("chunks/"):
                files.collect(key, cutoff)
            else:
                files.remove(key)
        if garbage.paths:
            log.info("garbage collection removed %d paths (%d bytes)", len(garbage.paths), garbage.bytes)
    return garbage


def retain_after_publish(ctx: ServiceContext) -> None:
    """The retention policy right after a version was published (a failure is logged: the next
    housekeeping pass applies it)."""
    try:
        deleted = apply_retention(ctx)
        if deleted:
            log.info("retention deleted versions %s", deleted)
    except Exception:  # noqa: BLE001 - the job succeeded; retention is retried by the housekeeping
        log.exception("retention after publishing failed")
