"""Job state in the database: creation, claiming with a lease, heartbeats, cancellation, recovery.

A worker owns a job through its ``lease`` (a random token set when it claims the job). Every write a
worker makes is conditional on its lease, so a worker that was presumed dead and whose job was handed
to another one cannot overwrite the new owner's work. A running job whose heartbeat is older than
``job_stale_seconds`` is presumed lost: :func:`recover_stale_jobs` re-queues it, or fails it after
``job_max_attempts`` claims. Celery redelivery (``acks_late``) and this recovery may both deliver a job
twice; the claim is one conditional UPDATE, so only one delivery runs it.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from .db.models import FINAL_JOB_STATES, Job, utcnow
from .db.session import transaction
from .errors import Conflict, NotFound

Dispatch = Callable[[Job], None]  # sends a job's task to its queue


class LeaseLost(Exception):
    """Another attempt owns the job now; this one must stop without writing anything."""


class JobCancelled(Exception):
    """The job's cancel flag was seen by the worker."""


def create_job(session: Session, kind: str, corpus_ids: list[int], options: dict | None = None,
               base_version_id: int | None = None) -> Job:
    job = Job(kind=kind, state="queued", corpus_ids=list(corpus_ids), options=dict(options or {}),
              base_version_id=base_version_id, metrics={}, heartbeat_at=utcnow())
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def _stale_cutoff(stale_seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=stale_seconds)


def claim_job(sessions: sessionmaker[Session], job_id: int, max_attempts: int, stale_seconds: float) -> str | None:
    """Take ownership of a queued (or stale running) job: returns the lease, or None when the job is
    finished, owned by a live attempt, cancelled before it started, or out of attempts (then failed)."""
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.state in FINAL_JOB_STATES:
            return None
        claimable = or_(Job.state == "queued",
                        (Job.state.in_(("running", "cancelling"))) & (Job.heartbeat_at < _stale_cutoff(stale_seconds)))
        now = utcnow()
        if job.cancel_requested:
            session.execute(update(Job).where(Job.id == job_id, claimable).values(
                state="cancelled", finished_at=now, lease=None))
            return None
        if job.attempts >= max_attempts:
            session.execute(update(Job).where(Job.id == job_id, claimable).values(
                state="failed", finished_at=now, lease=None,
                error=f"gave up after {job.attempts} attempts: the worker running it was lost each time"))
            return None
        lease = uuid.uuid4().hex
        claimed = session.execute(update(Job).where(Job.id == job_id, claimable).values(
            state="running", lease=lease, attempts=Job.attempts + 1, started_at=now, heartbeat_at=now,
            error=None)).rowcount
        return lease if claimed else None


def heartbeat(sessions: sessionmaker[Session], job_id: int, lease: str, **fields) -> bool:
    """Record progress; returns whether cancellation was requested. Raises LeaseLost."""
    with transaction(sessions) as session:
        updated = session.execute(update(Job).where(Job.id == job_id, Job.lease == lease).values(
            heartbeat_at=utcnow(), **fields)).rowcount
        if not updated:
            raise LeaseLost(f"job {job_id}: lease {lease} is no longer the owner")
        return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def owned_job(session: Session, job_id: int, lease: str) -> Job:
    """The job row, locked for this transaction where the database can, if ``lease`` still owns it."""
    job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()
    if job is None or job.lease != lease:
        raise LeaseLost(f"job {job_id}: lease {lease} is no longer the owner")
    return job


def finish_job(sessions: sessionmaker[Session], job_id: int, lease: str, state: str, error: str | None = None) -> None:
    with transaction(sessions) as session:
        job = owned_job(session, job_id, lease)
        job.state, job.error, job.finished_at, job.lease = state, error, utcnow(), None


def request_cancel(session: Session, job_id: int) -> Job:
    job = get_job(session, job_id)
    if job.state in FINAL_JOB_STATES:
        raise Conflict(f"job {job_id} is already {job.state}")
    job.cancel_requested = True
    if job.state == "queued":
        job.state, job.finished_at = "cancelled", utcnow()
    else:
        job.state = "cancelling"
    return job


def recover_stale_jobs(sessions: sessionmaker[Session], dispatch: Dispatch, stale_seconds: float) -> list[int]:
    """Re-queue running jobs whose worker went silent and re-send queued jobs whose message may have
    been lost (sent longer ago than ``stale_seconds``); returns their ids."""
    cutoff = _stale_cutoff(stale_seconds)
    with transaction(sessions) as session:
        jobs = session.scalars(select(Job).where(Job.state.in_(("queued", "running", "cancelling")),
                                                 Job.heartbeat_at < cutoff).with_for_update()).all()
        for job in jobs:
            if job.state != "queued":
                job.state = "cancelled" if job.cancel_requested else "queued"
                job.lease = None
                if job.state == "cancelled":
                    job.finished_at = utcnow()
            job.heartbeat_at = utcnow()
        resend = [job for job in jobs if job.state == "queued"]
    for job in resend:
        dispatch(job)
    return [job.id for job in jobs]
