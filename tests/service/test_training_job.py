"""The training job as a plain function on PostgreSQL and a store: ingest → train → evaluate → publish →
activate; old experts stay bit-identical; a crash before publishing leaves no version; cancellation."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from sqlalchemy import select

from service.context import ServiceContext
from service.db.models import Corpus, Evaluation, Job, PoolVersion
from service.db.session import transaction
from service.jobs.ingest import parse_upload, run_ingest_job
from service.jobs.lease import create_job, recover_stale_jobs, request_cancel
from service.jobs.publish import activation_gate
from service.jobs.train import run_train_job
from service.jobs.uploads import accept_corpus
from service.store.versions import active_version_id, ensure_initial_version

from .conftest import domain_text, tiny_settings, wait_for


@pytest.fixture(scope="module")
def ctx(pg_url, tmp_path_factory):
    ctx = ServiceContext.from_settings(tiny_settings(tmp_path_factory.mktemp("home"), pg_url))
    ensure_initial_version(ctx)
    yield ctx
    ctx.close()


def upload(ctx, name: str, text: str, train_options: dict | None = None) -> tuple[int, int]:
    data = text.encode()
    with transaction(ctx.sessions) as session:
        corpus, job = accept_corpus(ctx, session, name, parse_upload(data, "text", len(data)), text, "text",
                                    True, train_options or {})
        return corpus.id, job.id


def ingest(ctx, job_id: int) -> int:
    """Run the ingest job; returns the training job it started."""
    started: list[Job] = []
    run_ingest_job(ctx, job_id, started.append)
    assert len(started) == 1
    return started[0].id


def row(ctx, model, key):
    with ctx.sessions() as session:
        return session.get(model, key)


@pytest.fixture(scope="module")
def two_versions(ctx):
    """English pre-trains version 1 into 2; code then grows version 2 into 3 (grow + freeze + replay)."""
    english, ingest_english = upload(ctx, "english", domain_text("english"), {"steps": 40})
    run_train_job(ctx, ingest(ctx, ingest_english))
    code, ingest_code = upload(ctx, "code", domain_text("code"), {"activate": "always", "freeze_old_experts": True})
    train_code = ingest(ctx, ingest_code)
    run_train_job(ctx, train_code)
    return english, code, train_code


def test_the_job_chain_publishes_evaluated_versions(ctx, two_versions):
    english, code, train_code = two_versions
    assert row(ctx, Corpus, english).state == "ready" and row(ctx, Corpus, code).train_bytes > 0
    job = row(ctx, Job, train_code)
    assert job.state == "succeeded", job.error
    assert job.progress == 1.0 and job.metrics["strategy"] == "grow_freeze_protect" and job.attempts == 1
    v3 = row(ctx, PoolVersion, job.result_version_id)
    v2 = row(ctx, PoolVersion, v3.parent_id)
    assert v2.strategy == "naive" and v2.corpus_ids == [english] and v3.corpus_ids == [english, code]
    with ctx.sessions() as session:
        assert active_version_id(session) == v3.id  # activate=always
        evaluations = {e.corpus_id: e.bpb for e in session.scalars(
            select(Evaluation).where(Evaluation.version_id == v3.id))}
    assert evaluations.keys() == {english, code}
    assert evaluations == pytest.approx({int(c): b for c, b in job.metrics["bpb"].items()})
    segments = v3.segments["1"]
    assert [s["corpus_ids"] for s in segments] == [[], [code]]  # the new segment remembers its corpus
    assert v3.experts["1"] == segments[-1]["end"] > v2.experts["1"]


def test_old_experts_are_bit_identical_in_the_child(ctx, two_versions):
    job = row(ctx, Job, two_versions[2])
    v3 = row(ctx, PoolVersion, job.result_version_id)
    parent = ctx.store.load_model(row(ctx, PoolVersion, v3.parent_id).checkpoint)
    child = ctx.store.load_model(v3.checkpoint)
    old, new = parent.peer_layers()[1], child.peer_layers()[1]
    n = old.num_experts
    assert torch.equal(new.expert_down[:n], old.expert_down) and torch.equal(new.expert_up[:n], old.expert_up)
    assert not torch.equal(new.expert_up[n:], torch.zeros_like(new.expert_up[n:]))  # the new segment learnt


def test_a_crash_before_publishing_leaves_no_version_and_the_retry_publishes(ctx, two_versions, monkeypatch):
    english, code, _ = two_versions
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", [code], {"steps": 3}).id

    def crash(*args, **kwargs):
        raise SystemExit("worker killed while writing the checkpoint")

    monkeypatch.setattr(ctx.store, "save_model", crash)
    with pytest.raises(SystemExit):
        run_train_job(ctx, job_id)
    with ctx.sessions() as session:
        assert session.scalar(select(PoolVersion).where(PoolVersion.job_id == job_id)) is None
        job = session.get(Job, job_id)
        assert job.state == "running"  # as a killed worker leaves it: recovery re-queues it when it goes stale
        job.state, job.lease = "queued", None
        session.commit()
    monkeypatch.undo()
    run_train_job(ctx, job_id)
    job = row(ctx, Job, job_id)
    assert job.state == "succeeded" and job.attempts == 2 and job.result_version_id is not None


def test_a_cancel_request_stops_a_running_job_without_a_version(ctx, two_versions):
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", [two_versions[1]], {"steps": 100_000}).id
    worker = threading.Thread(target=run_train_job, args=(ctx, job_id))
    worker.start()
    wait_for(lambda: row(ctx, Job, job_id).metrics.get("step"), 60, what="the job to report training steps")
    with transaction(ctx.sessions) as session:
        assert request_cancel(session, job_id).state == "cancelling"
    worker.join(timeout=60)
    job = row(ctx, Job, job_id)
    assert job.state == "cancelled" and job.result_version_id is None and job.finished_at is not None
    with ctx.sessions() as session:
        assert session.scalar(select(PoolVersion).where(PoolVersion.job_id == job_id)) is None


def with_settings(ctx, **updates):
    return dataclasses.replace(ctx, settings=ctx.settings.model_copy(update=updates))


def test_a_cancel_the_training_loop_did_not_see_publishes_nothing(ctx, two_versions):
    """The loop reads the cancel flag once a heartbeat interval: a cancel after its last look (here, the whole run)
    answered "cancelling", and then the job evaluated, published and activated its version anyway."""
    slow = with_settings(ctx, job_heartbeat_seconds=3600.0)  # the loop's first look is its only one
    with ctx.sessions() as session:
        active_before = active_version_id(session)
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", [two_versions[1]], {"steps": 400, "activate": "always"}).id
    worker = threading.Thread(target=run_train_job, args=(slow, job_id))
    worker.start()
    wait_for(lambda: row(ctx, Job, job_id).metrics.get("strategy"), 60, what="the job to start training")
    time.sleep(0.3)
    with transaction(ctx.sessions) as session:
        assert request_cancel(session, job_id).state == "cancelling"
    worker.join(timeout=120)
    job = row(ctx, Job, job_id)
    assert job.state == "cancelled" and job.result_version_id is None, (job.state, job.metrics.get("step"))
    with ctx.sessions() as session:
        assert session.scalar(select(PoolVersion).where(PoolVersion.job_id == job_id)) is None
        assert active_version_id(session) == active_before


def test_every_stretch_of_an_attempt_heartbeats(ctx, two_versions):
    """Evaluating child and parent on every corpus (here: a large validation split) sent no heartbeat: past
    PEER_JOB_STALE_SECONDS the watchdog re-queued the job and the finished attempt lost its lease at commit."""
    big = with_settings(ctx, val_fraction=0.5, eval_max_batches=100_000)
    corpus_id, ingest_id = upload(big, "long evaluation", domain_text("english", 12000, seed=3),
                                  {"steps": 5, "activate": "never"})  # the lineage of the next tests stays
    train_id = ingest(big, ingest_id)
    stale = 1.5
    watching, requeued = threading.Event(), []

    def watchdog() -> None:  # a worker's watchdog, with a short stale timeout
        while not watching.wait(0.1):
            requeued.extend(recover_stale_jobs(ctx.sessions, lambda job: None, 3600, running_stale_seconds=stale))

    thread = threading.Thread(target=watchdog)
    thread.start()
    started = time.monotonic()
    try:
        run_train_job(with_settings(big, job_stale_seconds=stale), train_id)
    finally:
        watching.set()
        thread.join()
    job = row(ctx, Job, train_id)
    assert time.monotonic() - started > 3 * stale, "the attempt was too short to go stale"
    assert not requeued and job.state == "succeeded" and job.attempts == 1, (requeued, job.state, job.error)


def test_an_ingest_cancelled_while_it_runs_starts_no_training(ctx):
    text = "\n\n".join(f"paragraph {i}: " + "words " * 40 for i in range(200_000))  # ~52 MB: a second or more
    corpus_id, job_id = upload(with_settings(ctx, max_corpus_bytes=60_000_000), "cancelled ingest", text)
    started: list[Job] = []
    worker = threading.Thread(target=run_ingest_job, args=(ctx, job_id, started.append))
    worker.start()
    wait_for(lambda: row(ctx, Job, job_id).state == "running", 30, interval=0.01, what="the ingest to start")
    with transaction(ctx.sessions) as session:
        assert request_cancel(session, job_id).state == "cancelling"
    worker.join(timeout=120)
    assert row(ctx, Job, job_id).state == "cancelled" and not started
    corpus = row(ctx, Corpus, corpus_id)
    assert corpus.state == "failed" and "cancelled" in corpus.error


def test_training_on_a_corpus_that_is_not_ingested_fails_with_a_reason(ctx):
    with transaction(ctx.sessions) as session:
        corpus = Corpus(name="raw", source="upload", state="pending", sha256="0" * 64, raw_bytes=1, documents=1)
        session.add(corpus)
        session.flush()
        job_id = create_job(session, "train", [corpus.id]).id
    run_train_job(ctx, job_id)
    job = row(ctx, Job, job_id)
    assert job.state == "failed" and "not ingested" in job.error


def test_activation_gate():
    parent = {1: 2.0, 2: 5.0}
    assert activation_gate({1: 2.09, 2: 3.0}, parent, [1], [2], 0.05)[0] is True
    passed, reason = activation_gate({1: 2.2, 2: 3.0}, parent, [1], [2], 0.05)
    assert not passed and "forgot more than 5%" in reason and "corpus 1" in reason
    passed, reason = activation_gate({1: 2.0, 2: 5.1}, parent, [1], [2], 0.05)
    assert not passed and "did not learn" in reason


def test_gates_fail_on_a_non_finite_evaluation_and_the_job_says_it_diverged():
    """Every comparison with NaN is false: a NaN bits per byte passed the activation and forget gates."""
    from service.jobs.progress import Diverged
    from service.jobs.publish import check_evaluations, forget_gate

    nan, parent = float("nan"), {1: 2.0, 2: 5.0}
    assert activation_gate({1: nan, 2: 3.0}, parent, [1], [2], 0.05)[0] is False
    assert activation_gate({1: 2.0, 2: nan}, parent, [1], [2], 0.05)[0] is False
    assert forget_gate({1: nan, 2: 5.0}, parent, [1], 2, 0.05)[0] is False
    for child, parent_bpb in (({1: nan}, {1: 2.0}), ({1: 2.0}, {1: float("inf")})):
        with pytest.raises(Diverged, match="diverged"):
            check_evaluations(child, parent_bpb)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_diverging_job_fails_with_the_reason_and_publishes_nothing(dialect, tmp_path):
    """A NaN loss failed the job on a database constraint: PostgreSQL refused the heartbeat's metrics (NaN is no
    JSON), SQLite the evaluation row (NaN stored as NULL)."""
    from service.db.migrate import upgrade

    from .conftest import PG_HOST, create_pg_database, drop_pg_database

    name = create_pg_database() if dialect == "postgresql" else None
    url = f"postgresql+psycopg://{PG_HOST}/{name}" if name else None
    settings = tiny_settings(tmp_path / "home", url, train_lr=1e9, train_expert_lr=1e9)  # diverges at once
    upgrade(settings.resolved_database_url)
    diverging = ServiceContext.from_settings(settings)
    try:
        ensure_initial_version(diverging)
        _, ingest_id = upload(diverging, "english", domain_text("english"), {"steps": 30})
        train_id = ingest(diverging, ingest_id)
        run_train_job(diverging, train_id)
        job = row(diverging, Job, train_id)
        assert job.state == "failed" and "the training loss at step" in job.error and "diverged" in job.error, job.error
        with diverging.sessions() as session:
            assert session.scalar(select(PoolVersion).where(PoolVersion.job_id == train_id)) is None
    finally:
        diverging.close()
        if name:
            drop_pg_database(name)


@pytest.mark.parametrize("options", [{},  # replay, the default
                                     {"freeze_old_experts": False, "replay_fraction": 0, "review_steps": 2},
                                     {"strategy": "grow_freeze", "review_steps": 2}])
def test_when_an_old_corpus_text_is_gone_the_job_replays_the_parents_samples(ctx, two_versions, options):
    """Replay, or without replay the routing review, reads earlier corpora: with their text deleted, the parent's
    own samples take their place (a review-only job failed with a ValueError from the stage instead)."""
    english, code, _ = two_versions
    train_text = ctx.store.corpus_path(english, "train")
    kept = train_text.read_bytes()
    train_text.unlink()
    try:
        with transaction(ctx.sessions) as session:
            job_id = create_job(session, "train", [code], {"steps": 4, "activate": "never", **options}).id
        run_train_job(ctx, job_id)
    finally:
        train_text.write_bytes(kept)
    job = row(ctx, Job, job_id)
    assert job.state == "succeeded", job.error
    assert job.metrics["replay_source"] == "parent" and job.metrics["corpora_gone"] == [english]
    assert set(job.metrics["bpb"]) == {str(english), str(code)}, "the validation split is still there: evaluated"


def test_job_seeds_are_bounded_at_submission_and_the_largest_trains(ctx, two_versions):
    """A seed of 2^64 was accepted and failed the job later (torch takes no seed past 2^64 - 1, and a job adds
    offsets to its seed); the bound is a signed 64-bit integer's, as for sampling seeds."""
    from service.jobs.options import SEED_MAX, parse_forget_options, parse_job_options
    from service.errors import InvalidInput

    for seed in (SEED_MAX + 1, 2**64):
        with pytest.raises(InvalidInput, match="seed"):
            parse_job_options({"seed": seed})
        with pytest.raises(InvalidInput, match="seed"):
            parse_forget_options({"seed": seed}, 100)
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", [two_versions[1]], {"steps": 3, "seed": SEED_MAX, "activate": "never"}).id
    run_train_job(ctx, job_id)
    job = row(ctx, Job, job_id)
    assert job.state == "succeeded", job.error
