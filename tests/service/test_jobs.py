"""Job state in PostgreSQL: one owner per job, leases, cancellation, recovery of lost workers.

Each test runs in a transaction that is rolled back (the service's own commits become SAVEPOINTs).
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import sessionmaker

from service.db.models import Corpus, Job, utcnow
from service.db.session import make_engine
from service.errors import Conflict
from service.jobs.lease import (LeaseLost, claim_job, create_job, dispatch_job, finish_job, hand_back_job, heartbeat,
                                recover_stale_jobs, request_cancel, requeue_running_jobs)

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


def sent_at(sessions, job_id, seconds_ago: float) -> None:
    with sessions() as session:
        session.get(Job, job_id).dispatched_at = utcnow() - timedelta(seconds=seconds_ago)
        session.commit()


def test_recovery_requeues_silent_jobs_and_sends_what_never_reached_the_broker(sessions):
    silent = new_job(sessions)
    claim_job(sessions, silent, 3, STALE)
    age(sessions, silent, STALE + 1)
    never_sent = new_job(sessions)  # the broker was down when it was stored
    just_sent = new_job(sessions)
    sent_at(sessions, just_sent, 1)
    cancelling = new_job(sessions)
    claim_job(sessions, cancelling, 3, STALE)
    with sessions() as session:
        request_cancel(session, cancelling)
        session.commit()
    age(sessions, cancelling, STALE + 1)

    sent: list[int] = []
    recovered = recover_stale_jobs(sessions, lambda job: sent.append(job.id), STALE)
    assert sorted(recovered) == sorted(sent) == sorted([silent, never_sent])
    assert load(sessions, silent).state == "queued" and load(sessions, silent).lease is None
    assert load(sessions, silent).dispatched_at is not None  # recorded: the next pass does not send it again
    assert load(sessions, cancelling).state == "cancelled"
    assert recover_stale_jobs(sessions, lambda job: sent.append(job.id), STALE) == []
    assert claim_job(sessions, silent, 3, STALE) is not None  # the re-sent message can claim it


def test_a_backlog_behind_a_busy_worker_is_not_sent_again(sessions):
    """The watchdog used to re-send every waiting job each stale period: duplicate messages grew with the
    backlog. A message sent long ago is presumed lost only while nothing of its queue runs."""
    running = new_job(sessions)
    lease = claim_job(sessions, running, 3, STALE)
    waiting = [new_job(sessions) for _ in range(3)]
    for job_id in waiting:
        sent_at(sessions, job_id, 10 * STALE)
    sent: list[int] = []
    assert recover_stale_jobs(sessions, lambda job: sent.append(job.id), STALE) == [] and sent == []

    finish_job(sessions, running, lease, "succeeded")  # the queue is idle, yet they wait: their messages are lost
    assert recover_stale_jobs(sessions, lambda job: sent.append(job.id), STALE) == waiting == sent


def test_a_broker_that_is_down_leaves_the_job_stored_and_unsent(sessions):
    job_id = new_job(sessions)

    def broker_down(job):
        raise ConnectionRefusedError("Error 111 connecting to 127.0.0.1:6390")

    assert dispatch_job(sessions, broker_down, load(sessions, job_id)) is False
    assert load(sessions, job_id).dispatched_at is None and load(sessions, job_id).state == "queued"
    sent: list[int] = []
    assert recover_stale_jobs(sessions, lambda job: sent.append(job.id), STALE) == [job_id] == sent


def test_cancel_never_overwrites_a_job_that_finished_meanwhile(sessions):
    job_id = new_job(sessions)
    lease = claim_job(sessions, job_id, 3, STALE)
    with sessions() as api:
        assert api.get(Job, job_id).state == "running"  # the API's session holds the running row
        finish_job(sessions, job_id, lease, "succeeded")  # the worker publishes meanwhile
        with pytest.raises(Conflict, match="already succeeded"):
            request_cancel(api, job_id)
        api.commit()
    job = load(sessions, job_id)
    assert job.state == "succeeded" and not job.cancel_requested


def ingest_job(sessions) -> tuple[int, int]:
    with sessions() as session:
        corpus = Corpus(name="c", source="upload", state="pending", sha256="0" * 64, raw_bytes=1, documents=1)
        session.add(corpus)
        session.flush()
        job = create_job(session, "ingest", [corpus.id])
        session.commit()
        return job.id, corpus.id


def corpus_state(sessions, corpus_id) -> tuple[str, str | None]:
    with sessions() as session:
        corpus = session.get(Corpus, corpus_id)
        return corpus.state, corpus.error


def test_an_ingest_that_will_never_run_fails_its_corpus(sessions):
    cancelled, cancelled_corpus = ingest_job(sessions)
    with sessions() as session:
        request_cancel(session, cancelled)
        session.commit()
    assert corpus_state(sessions, cancelled_corpus) == ("failed", f"ingest job {cancelled} was cancelled")

    exhausted, exhausted_corpus = ingest_job(sessions)
    with sessions() as session:
        session.get(Job, exhausted).attempts = 3
        session.commit()
    assert claim_job(sessions, exhausted, 3, STALE) is None
    state, error = corpus_state(sessions, exhausted_corpus)
    assert state == "failed" and "gave up after 3 attempts" in error


def test_a_job_handed_back_at_shutdown_is_queued_at_once_without_spending_an_attempt(sessions):
    job_id = new_job(sessions)
    lease = claim_job(sessions, job_id, 3, STALE)
    hand_back_job(sessions, job_id, lease)
    job = load(sessions, job_id)
    assert (job.state, job.lease, job.attempts, job.dispatched_at) == ("queued", None, 0, None)
    assert claim_job(sessions, job_id, 3, STALE) is not None  # no stale timeout to wait for


def test_requeue_running_jobs_takes_every_running_job_when_asked_for_all(sessions):
    """``peer-service serve`` owns its workers: at start every job still running was interrupted."""
    job_id = new_job(sessions)
    claim_job(sessions, job_id, 3, STALE)
    with sessions() as session:
        assert requeue_running_jobs(session, STALE) == []  # its heartbeat is fresh
        assert requeue_running_jobs(session, 0) == [job_id]
        session.commit()
    assert load(sessions, job_id).state == "queued"
