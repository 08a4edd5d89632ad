"""Job state in PostgreSQL: one owner per job, leases, cancellation, recovery of lost workers.

Each test runs in a transaction that is rolled back (the service's own commits become SAVEPOINTs).
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import sessionmaker

from service.db.models import Job, utcnow
from service.db.session import make_engine
from service.errors import Conflict
from service.jobs import LeaseLost, claim_job, create_job, finish_job, heartbeat, recover_stale_jobs, request_cancel

STALE = 60.0


@pytest.fixture()
def sessions(pg_url):
    engine = make_engine(pg_url)
    connection = engine.connect()
    outer = connection.begin()
    yield sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    outer.rollback()
    connection.close()
    engine.dispose()


def new_job(sessions, **fields) -> int:
    with sessions() as session:
        job = create_job(session, "train", [1])
        for name, value in fields.items():
            setattr(job, name, value)
        session.commit()
        return job.id


def load(sessions, job_id) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def age(sessions, job_id, seconds: float) -> None:
    with sessions() as session:
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=seconds)
        session.commit()


def test_a_job_has_one_owner_until_its_heartbeat_goes_stale(sessions):
    job_id = new_job(sessions)
    lease = claim_job(sessions, job_id, max_attempts=3, stale_seconds=STALE)
    assert lease and load(sessions, job_id).state == "running"
    assert claim_job(sessions, job_id, 3, STALE) is None  # a second delivery of the message does nothing
    assert heartbeat(sessions, job_id, lease, progress=0.5) is False

    age(sessions, job_id, STALE + 1)  # the owner went silent
    second = claim_job(sessions, job_id, 3, STALE)
    assert second and second != lease
    job = load(sessions, job_id)
    assert job.attempts == 2 and job.lease == second
    with pytest.raises(LeaseLost):  # the presumed-dead attempt can no longer write
        heartbeat(sessions, job_id, lease, progress=0.9)
    with pytest.raises(LeaseLost):
        finish_job(sessions, job_id, lease, "succeeded")
    finish_job(sessions, job_id, second, "succeeded")
    assert load(sessions, job_id).state == "succeeded"
    assert claim_job(sessions, job_id, 3, STALE) is None


def test_a_job_out_of_attempts_fails_with_a_reason(sessions):
    job_id = new_job(sessions, attempts=3)
    assert claim_job(sessions, job_id, max_attempts=3, stale_seconds=STALE) is None
    job = load(sessions, job_id)
    assert job.state == "failed" and "gave up after 3 attempts" in job.error and job.finished_at is not None


def test_cancellation_of_queued_running_and_finished_jobs(sessions):
    queued = new_job(sessions)
    with sessions() as session:
        assert request_cancel(session, queued).state == "cancelled"
        session.commit()
    assert claim_job(sessions, queued, 3, STALE) is None

    running = new_job(sessions)
    lease = claim_job(sessions, running, 3, STALE)
    with sessions() as session:
        assert request_cancel(session, running).state == "cancelling"
        session.commit()
    assert heartbeat(sessions, running, lease) is True  # the worker sees the flag at its next heartbeat
    finish_job(sessions, running, lease, "cancelled")
    with sessions() as session, pytest.raises(Conflict, match="already cancelled"):
        request_cancel(session, running)


def test_recovery_requeues_silent_jobs_and_resends_old_queued_ones(sessions):
    silent = new_job(sessions)
    claim_job(sessions, silent, 3, STALE)
    age(sessions, silent, STALE + 1)
    lost_message = new_job(sessions)
    age(sessions, lost_message, STALE + 1)
    fresh = new_job(sessions)
    cancelling = new_job(sessions)
    claim_job(sessions, cancelling, 3, STALE)
    with sessions() as session:
        request_cancel(session, cancelling)
        session.commit()
    age(sessions, cancelling, STALE + 1)

    sent: list[int] = []
    recovered = recover_stale_jobs(sessions, lambda job: sent.append(job.id), STALE)
    assert sorted(recovered) == sorted([silent, lost_message, cancelling])
    assert sorted(sent) == sorted([silent, lost_message])
    assert fresh not in sent
    assert load(sessions, silent).state == "queued" and load(sessions, silent).lease is None
    assert load(sessions, cancelling).state == "cancelled"
    assert claim_job(sessions, silent, 3, STALE) is not None  # the re-sent message can claim it
