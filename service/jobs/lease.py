"""Job state in the database: creation, claiming with a lease, heartbeats, cancellation, recovery.

A worker owns a job through its ``lease`` (a random token set when it claims the job). Every write a
worker makes is conditional on its lease, so a worker that was presumed dead and whose job was handed
to another one cannot overwrite the new owner's work. A running job whose heartbeat is older than
``job_stale_seconds`` is presumed lost: :func:`recover_stale_jobs` re-queues it, or fails it after
``job_max_attempts`` claims. Celery redelivery (``acks_late``) and this recovery may both deliver a job
twice; the claim is one conditional UPDATE, so only one delivery runs it.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ..db.models import Corpus, Job, utcnow
from ..db.session import transaction
from ..errors import Conflict, NotFound

Dispatch = Callable[[Job], None]  # sends a job's task to its queue
QUEUES = {"ingest": "ingest", "train": "train", "forget": "train"}  # job kind → queue (forgetting loads a model)
log = logging.getLogger(__name__)


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


def close_job(session: Session, job: Job, state: str, error: str | None = None) -> None:
    """Move ``job`` (a row locked or owned in this transaction) to a final ``state``. An ingest job that
    ends without succeeding takes its corpus with it (failed, with the reason), so no corpus waits
    ``pending`` for an ingest that will never run."""
    job.state, job.error, job.finished_at, job.lease = state, error, utcnow(), None
    if job.kind == "ingest" and state != "succeeded":
        corpus = session.get(Corpus, job.corpus_ids[0]) if job.corpus_ids else None
        if corpus is not None and corpus.state == "pending":
            corpus.state = "failed"
            corpus.error = error or f"ingest job {job.id} was {state}"


def claim_job(sessions: sessionmaker[Session], job_id: int, max_attempts: int, stale_seconds: float) -> str | None:
    """Take ownership of a queued (or stale running) job: returns the lease, or None when the job is
    finished, owned by a live attempt, cancelled before it started, or out of attempts (then failed)."""
    with transaction(sessions) as session:
        claimable = or_(Job.state == "queued",
                        (Job.state.in_(("running", "cancelling"))) & (Job.heartbeat_at < _stale_cutoff(stale_seconds)))
        job = session.scalars(select(Job).where(Job.id == job_id, claimable).with_for_update()).one_or_none()
        if job is None:  # unknown, finished, or owned by a live attempt
            return None
        if job.cancel_requested:
            close_job(session, job, "cancelled")
            return None
        if job.attempts >= max_attempts:
            close_job(session, job, "failed",
                      f"gave up after {job.attempts} attempts: the worker running it was lost each time")
            return None
        lease = uuid.uuid4().hex
        now = utcnow()
        job.state, job.lease, job.attempts, job.started_at, job.heartbeat_at, job.error = \
            "running", lease, job.attempts + 1, now, now, None
        return lease


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
        close_job(session, owned_job(session, job_id, lease), state, error)


def hand_back_job(sessions: sessionmaker[Session], job_id: int, lease: str) -> None:
    """An attempt interrupted by its worker's shutdown (not the job's fault): queued again at once, the
    attempt not counted, so the next worker (or this one restarted) claims it without waiting for the
    stale timeout. The caller dispatches it again."""
    with transaction(sessions) as session:
        job = owned_job(session, job_id, lease)
        if job.cancel_requested:
            close_job(session, job, "cancelled")
            return
        job.state, job.lease, job.attempts, job.heartbeat_at = "queued", None, max(0, job.attempts - 1), utcnow()
        job.dispatched_at = None


def request_cancel(session: Session, job_id: int) -> Job:
    """Cancel a queued job at once or ask a running one to stop. Conditional UPDATEs, so a job that
    finishes meanwhile is never overwritten (409 instead)."""
    get_job(session, job_id)
    for states, state in ((("queued",), "cancelled"), (("running", "cancelling"), "cancelling")):
        if session.execute(update(Job).where(Job.id == job_id, Job.state.in_(states))
                           .values(cancel_requested=True, state=state)).rowcount:
            job = _fresh(session, job_id)
            if state == "cancelled":
                close_job(session, job, "cancelled")
            return job
    raise Conflict(f"job {job_id} is already {_fresh(session, job_id).state}")


def _fresh(session: Session, job_id: int) -> Job:
    return session.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one()


def dispatch_job(sessions: sessionmaker[Session], dispatch: Dispatch, job: Job) -> bool:
    """Send ``job``'s message and record when it reached the broker. A broker that is down is not the
    caller's problem: the job is in the database (the source of truth) with ``dispatched_at`` unset, and
    the watchdog sends it once the broker answers. Returns whether it was sent."""
    try:
        dispatch(job)
    except Exception as exc:  # noqa: BLE001 - kombu raises many types for an unreachable broker
        log.warning("job %s: broker unreachable (%s: %s); the watchdog will send it", job.id, type(exc).__name__, exc)
        return False
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == job.id).values(dispatched_at=utcnow()))
    return True


def requeue_running_jobs(session: Session, silent_seconds: float) -> list[int]:
    """Running jobs without a heartbeat for ``silent_seconds`` (0: all of them) are presumed lost with their
    worker: queued again to be sent (or cancelled, if that was asked). Returns their ids."""
    jobs = session.scalars(select(Job).where(Job.state.in_(("running", "cancelling")),
                                             Job.heartbeat_at <= _stale_cutoff(silent_seconds)).with_for_update()).all()
    for job in jobs:
        if job.cancel_requested:
            close_job(session, job, "cancelled")
        else:
            job.state, job.lease, job.heartbeat_at, job.dispatched_at = "queued", None, utcnow(), None
    return [job.id for job in jobs]


def recover_stale_jobs(sessions: sessionmaker[Session], dispatch: Dispatch, stale_seconds: float,
                       running_stale_seconds: float | None = None) -> list[int]:
    """Re-queue running jobs whose worker went silent for ``running_stale_seconds`` (default
    ``stale_seconds``), and send queued jobs whose message never reached the broker, or was sent more
    than ``stale_seconds`` ago while no job of their queue runs (then it was lost: e.g. Redis restarted
    empty). A backlog behind a busy worker is not re-sent, so duplicate messages do not pile up with it
    (a duplicate is harmless: the claim is one conditional UPDATE). Returns the ids of the jobs sent."""
    cutoff = _stale_cutoff(stale_seconds)
    with transaction(sessions) as session:
        requeue_running_jobs(session, stale_seconds if running_stale_seconds is None else running_stale_seconds)
        busy = {QUEUES[kind] for kind in session.scalars(
            select(Job.kind).where(Job.state.in_(("running", "cancelling"))).distinct())}
        resend = []
        for job in session.scalars(select(Job).where(Job.state == "queued").order_by(Job.id)).all():
            lost = job.dispatched_at is not None and job.dispatched_at < cutoff and QUEUES[job.kind] not in busy
            if job.dispatched_at is None or lost:
                resend.append(job)
        session.expunge_all()
    return [job.id for job in resend if dispatch_job(sessions, dispatch, job)]
