"""Data safety of the service on the embedded SQLite default, each test a defect that was there before:
activation of a version that cannot load, the start with such a version active, an attempt that lost its
lease, lineage forks between queued jobs, database outages during a job, usage counters of retired
versions, a full store, and blocking work on the event loop."""
from __future__ import annotations

import dataclasses
import errno
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from peer_model.model import PEERTransformer
from service.api.app import create_app
from service.context import ServiceContext
from service.db.models import Corpus, ExpertUsage, Job, PoolVersion
from service.db.session import make_engine, transaction
from service.jobs.lease import JobCancelled, claim_job, create_job, request_cancel
from service.jobs.progress import Attempt, JobProgress
from service.jobs.publish import publish_version
from service.store.store import Store
from service.store.versions import activate, active_version_id, describe_pools, ensure_initial_version

from .conftest import ServerThread, domain_text, free_port, tiny_settings, wait_for


def add_version(ctx: ServiceContext, seed: int, checkpoint_exists: bool = True, activate_it: bool = False) -> int:
    """A version made without training: a fresh model of the configured shape (seed ``seed``)."""
    torch.manual_seed(seed)
    model = PEERTransformer(ctx.settings.fresh_model_config())
    key = Store.version_key(f"test-{seed}")
    if checkpoint_exists:
        ctx.store.save_model(key, model)
    experts, segments = describe_pools(model, None, [])
    with transaction(ctx.sessions) as session:
        version = PoolVersion(parent_id=1, checkpoint=key, model_config_json=model.config.to_dict(), experts=experts,
                              segments=segments, corpus_ids=[], gate_reason="test")
        session.add(version)
        session.flush()
        if activate_it:
            activate(session, version.id, "test", "test")
        return version.id


def dead_sessions() -> sessionmaker:
    """Sessions on a PostgreSQL port where nothing listens: every statement raises OperationalError."""
    return sessionmaker(make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"))


@pytest.fixture()
def settings(tmp_path):
    return tiny_settings(tmp_path / "home")


@pytest.fixture()
def ctx(settings):
    ctx = ServiceContext.from_settings(settings)
    from service.db.migrate import upgrade

    upgrade(settings.resolved_database_url)
    ensure_initial_version(ctx)
    yield ctx
    ctx.close()


def active(ctx) -> int:
    with ctx.sessions() as session:
        return active_version_id(session)


def test_a_version_that_cannot_load_is_refused_before_the_database_points_at_it(settings, ctx):
    broken = add_version(ctx, seed=1, checkpoint_exists=False)
    good = add_version(ctx, seed=2)
    with TestClient(create_app(settings, dispatch=lambda job: None)) as client:
        response = client.post(f"/v1/versions/{broken}/activate")
        assert response.status_code == 503 and "cannot be loaded" in response.json()["detail"]
        assert active(ctx) == 1 and client.get("/v1/status").json()["served_version"] == 1
        assert client.post(f"/v1/versions/{good}/activate").status_code == 200
        assert active(ctx) == good and client.get("/v1/status").json()["served_version"] == good


def test_at_start_an_unloadable_active_version_falls_back_to_the_newest_earlier_one(settings, ctx):
    earlier = add_version(ctx, seed=1, activate_it=True)
    broken = add_version(ctx, seed=2, activate_it=True)
    (ctx.store.root / Store.version_key("test-2")).rename(ctx.store.root / "lost")  # the store lost its files
    with TestClient(create_app(settings, dispatch=lambda job: None)) as client:
        status = client.get("/v1/status").json()
        assert (status["active_version"], status["served_version"]) == (broken, earlier)
        assert f"active version {broken} cannot be loaded" in status["fallback"]
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["fallback"].startswith(f"version {earlier} serves in place")
        assert "cannot be loaded:" not in ready.json()["fallback"]  # the cause (paths, errors) is /v1/status's
        assert client.post("/v1/generate", json={"prompt": "a", "max_tokens": 2}).json()["version"] == earlier
        assert client.post(f"/v1/versions/{earlier}/activate").status_code == 200  # the operator resolves it
        assert client.get("/v1/status").json()["fallback"] is None


def test_a_poll_that_read_the_database_before_an_activation_does_not_swap_back(settings, ctx, monkeypatch):
    """The watcher read the active version outside the swap lock: a poll that read it just before an activation
    committed, and compared it with the served version just after the activation swapped, put the previous version
    back until the next notification or poll. The poll here is held between its read and what follows until the
    activation is served (a scheduler can do that to any thread)."""
    from service.serving import engine

    newer = add_version(ctx, seed=1)
    served, read = threading.Event(), engine.active_version_id

    def held_read(session):
        version = read(session)
        if threading.current_thread().name == "poll":
            served.wait(timeout=5)
        return version

    monkeypatch.setattr(engine, "active_version_id", held_read)
    with TestClient(create_app(settings, dispatch=lambda job: None)) as client:
        host, polls = client.app.state.host, []

        def commit() -> None:  # the activation's transaction, the watcher's poll reading just before it
            poll = threading.Thread(target=host.sync_active, name="poll")
            poll.start()
            time.sleep(0.3)
            with transaction(ctx.sessions) as session:
                activate(session, newer, "test", "test")
            polls.append(poll)

        host.activate(newer, commit)
        served.set()
        polls[0].join(timeout=30)
        assert host.version_id == newer == active(ctx)
        assert client.post("/v1/generate", json={"prompt": "a", "max_tokens": 1}).json()["version"] == newer


def test_an_attempt_that_lost_its_lease_never_overwrites_the_published_version(ctx):
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", []).id
    stale = ctx.settings.job_stale_seconds
    lost = claim_job(ctx.sessions, job_id, 3, stale)
    with transaction(ctx.sessions) as session:  # its worker went silent: another attempt claims the job
        session.get(Job, job_id).heartbeat_at = session.get(Job, job_id).heartbeat_at.replace(year=2000)
    owner = claim_job(ctx.sessions, job_id, 3, stale)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(PEERTransformer(ctx.settings.fresh_model_config()))
    segments = {str(i): [] for i in models[0].peer_layers()}
    args = ([], [], "naive", {}, (True, "ok"), "never", {})
    version_id = publish_version(ctx, job_id, owner, 1, models[0], segments, *args)
    with pytest.raises(Exception, match="no longer the owner"):
        publish_version(ctx, job_id, lost, 1, models[1], segments, *args)
    with ctx.sessions() as session:
        checkpoint = session.get(PoolVersion, version_id).checkpoint
    served = ctx.store.load_model(checkpoint)
    assert torch.equal(served.embed.weight, models[0].embed.weight)


def test_publishing_refuses_a_job_whose_cancellation_was_requested(ctx):
    """A cancel during evaluation or the checkpoint write answered "cancelling" and the version went live anyway."""
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", []).id
    lease = claim_job(ctx.sessions, job_id, 3, 60)
    with transaction(ctx.sessions) as session:
        assert request_cancel(session, job_id).state == "cancelling"
    torch.manual_seed(4)
    child = PEERTransformer(ctx.settings.fresh_model_config())
    segments = {str(i): [] for i in child.peer_layers()}
    with pytest.raises(JobCancelled):
        publish_version(ctx, job_id, lease, 1, child, segments, [], [], "naive", {}, (True, "ok"), "always", {})
    with ctx.sessions() as session:
        assert session.scalar(select(PoolVersion).where(PoolVersion.job_id == job_id)) is None
    assert active(ctx) == 1 and not ctx.store.has(ctx.store.version_key(f"job-{job_id}-{lease[:12]}"))


def test_an_automatic_activation_needs_its_base_to_be_still_active(ctx):
    moved_to = add_version(ctx, seed=1, activate_it=True)  # activated while the job trained from version 1
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", []).id
    lease = claim_job(ctx.sessions, job_id, 3, 60)
    torch.manual_seed(3)
    child = PEERTransformer(ctx.settings.fresh_model_config())
    segments = {str(i): [] for i in child.peer_layers()}
    version_id = publish_version(ctx, job_id, lease, 1, child, segments, [], [], "naive", {}, (True, "gate passed"),
                                 "auto", {})
    assert active(ctx) == moved_to
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        assert job.result_version_id == version_id and job.base_version_id == 1
        assert not job.metrics["activated"] and "moved from 1 to" in job.metrics["gate"]


def test_jobs_queued_one_after_the_other_build_one_lineage(settings, ctx):
    """The second job was bound to the version active at submission: it trained beside the first, and its
    auto-activation replaced a version that knew the first corpus by one that never saw it."""
    from service.worker.inline import InlineWorker

    with InlineWorker(settings) as worker, TestClient(create_app(settings, dispatch=worker.dispatch)) as client:
        ids = []
        for name, domain in (("english", "english"), ("code", "code")):
            accepted = client.post("/v1/corpora", params={"name": name, "train": "false"},
                                   content=domain_text(domain, 200), headers={"content-type": "text/plain"}).json()
            ids.append(accepted["corpus"]["id"])
        worker.join()
        first = client.post("/v1/jobs", json={"corpus_ids": [ids[0]], "options": {"activate": "always"}}).json()
        second = client.post("/v1/jobs", json={"corpus_ids": [ids[1]], "options": {"activate": "always"}}).json()
        assert first["base_version_id"] is None and second["base_version_id"] is None  # not pinned at submission
        worker.join()
        first, second = (client.get(f"/v1/jobs/{j['id']}").json() for j in (first, second))
        assert first["state"] == second["state"] == "succeeded"
        assert second["base_version_id"] == first["result_version_id"]
        final = client.get(f"/v1/versions/{second['result_version_id']}").json()
        assert sorted(final["corpus_ids"]) == sorted(ids)


def test_a_heartbeat_rides_out_a_database_outage_up_to_its_patience(ctx):
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", []).id
    lease = claim_job(ctx.sessions, job_id, 3, 60)
    outage = dataclasses.replace(ctx, sessions=dead_sessions(),
                                 settings=ctx.settings.model_copy(update={"job_heartbeat_seconds": 0.0,
                                                                          "job_db_outage_seconds": 1.0}))
    attempt = Attempt(outage, job_id, lease)
    progress = JobProgress(attempt, steps=10)
    progress.on_log({"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0, "eta_s": 1.0})
    assert progress.should_stop() is False  # the database is gone: training goes on
    time.sleep(1.2)
    with pytest.raises(Exception, match="connect"):
        progress.should_stop()  # longer than PEER_JOB_DB_OUTAGE_SECONDS: the error comes through
    attempt.ctx = ctx
    assert progress.should_stop() is False  # and with the database back, the job heartbeats again


def test_usage_of_a_retired_version_survives_a_failed_write(settings, ctx):
    """An idle retired version used to be dropped before its counters were written: a failed write lost them."""
    newer = add_version(ctx, seed=1)
    with TestClient(create_app(settings, dispatch=lambda job: None)) as client:
        host = client.app.state.host
        working, loaded = host.ctx, host.load(newer)
        host.ctx = dataclasses.replace(working, sessions=dead_sessions())  # the database goes away
        assert client.post("/v1/generate", json={"prompt": "hello", "max_tokens": 8}).json()["version"] == 1
        host.install(loaded)  # version 1 retires; its last request has ended
        time.sleep(4 * settings.usage_flush_seconds)  # writes fail meanwhile
        assert not host._retired
        host.ctx = working  # the database is back

        def stored() -> int:
            with ctx.sessions() as session:
                return session.scalar(select(func.coalesce(func.sum(ExpertUsage.tokens), 0))
                                      .where(ExpertUsage.version_id == 1))

        assert wait_for(stored, 10, what="version 1's usage in the database") > 0


class FullStore(Store):
    """The store boundary failing writes as a full disk does."""

    def write_corpus(self, corpus_id, part, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_model(self, key, model, extra=None):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_store_refuses_uploads_with_507_and_stores_nothing(settings, ctx):
    app = create_app(settings, dispatch=lambda job: None)
    with TestClient(app) as client:
        app.state.ctx.store = FullStore(ctx.store.root)
        response = client.post("/v1/corpora", params={"name": "x"}, content="some text",
                               headers={"content-type": "text/plain"})
        assert response.status_code == 507 and "No space left" in response.json()["detail"]
    with ctx.sessions() as session:
        assert session.scalar(select(func.count(Corpus.id))) == 0
        assert session.scalar(select(func.count(Job.id))) == 0


def test_a_job_that_cannot_write_its_checkpoint_fails_and_publishes_nothing(ctx):
    from service.jobs.ingest import run_ingest_job
    from service.jobs.train import run_train_job
    from service.jobs.uploads import accept_corpus
    from service.jobs.ingest import parse_upload

    text = domain_text("english", 200)
    with transaction(ctx.sessions) as session:
        corpus, ingest = accept_corpus(ctx, session, "c", parse_upload(text.encode(), "text", 10**7), text, "text",
                                       True, {})
    started: list[Job] = []
    run_ingest_job(ctx, ingest.id, started.append)
    full = dataclasses.replace(ctx, store=FullStore(ctx.store.root))
    run_train_job(full, started[0].id)
    with ctx.sessions() as session:
        job = session.get(Job, started[0].id)
        assert job.state == "failed" and "No space left on device" in job.error
        assert session.scalar(select(func.count(PoolVersion.id))) == 1 and active_version_id(session) == 1
        assert session.get(Corpus, corpus.id).state == "ready"


class SlowStore(Store):
    """A store whose corpus writes hang until released (a slow disk, an NFS stall)."""

    def __init__(self, root, release: threading.Event):
        super().__init__(root)
        self.release = release

    def write_corpus(self, corpus_id, part, text):
        self.release.wait(30)
        return super().write_corpus(corpus_id, part, text)


def test_a_slow_upload_does_not_stall_the_event_loop(settings, ctx):
    """Parsing, fsync and commit of an upload ran on the event loop: every other request (and every SSE
    stream) waited for it."""
    app = create_app(settings, dispatch=lambda job: None)
    release = threading.Event()
    with ServerThread(app) as server:
        app.state.ctx.store = SlowStore(ctx.store.root, release)
        upload = threading.Thread(target=lambda: httpx.post(
            f"{server.url}/v1/corpora", params={"name": "slow"}, content="text " * 1000,
            headers={"content-type": "text/plain"}, timeout=60))
        upload.start()
        time.sleep(0.5)  # the upload is inside the store now
        try:
            assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
            generated = httpx.post(f"{server.url}/v1/generate", json={"prompt": "a", "max_tokens": 4}, timeout=5)
            assert generated.status_code == 200
        finally:
            release.set()
            upload.join(30)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected crash
def test_readiness_costs_no_generation_and_liveness_sees_a_dead_scheduler(settings, ctx):
    with TestClient(create_app(settings, dispatch=lambda job: None)) as client:
        host = client.app.state.host
        for _ in range(3):
            assert client.get("/readyz").status_code == 200
        layers = host._current.model.peer_layers().values()
        assert all(int(layer.usage_counts.sum()) == 0 for layer in layers)  # no probe tokens in the usage

        def crash() -> None:
            raise SystemExit("scheduler bug")

        host._round = crash  # the scheduler thread dies at its next round
        with host._cond:
            host._cond.notify_all()
        wait_for(lambda: "peer-scheduler" in host.dead_threads(), 10, what="the scheduler to die")
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["dead_threads"] == ["peer-scheduler"]
        assert client.get("/readyz").status_code == 503


def test_serve_gives_its_training_worker_the_cores_the_api_leaves(tmp_path, monkeypatch):
    from service.cli import training_threads

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert training_threads(tiny_settings(tmp_path)) == 1  # 2 cores: the API's decode thread and one for training
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert training_threads(tiny_settings(tmp_path, api_torch_threads=2)) == 14
    assert training_threads(tiny_settings(tmp_path, worker_torch_threads=3)) == 3  # an explicit setting wins


def test_an_unpinned_job_records_its_base_when_it_starts_and_a_retry_follows_the_active_version(ctx):
    """The base of an unpinned job was known only at publication, so retention could delete it under the job."""
    from service.store.retention import delete_version
    from service.jobs.runner import claim_base

    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", []).id
    lease = claim_job(ctx.sessions, job_id, 3, 60)
    assert claim_base(ctx, job_id, lease, "trained from") == (1, True)
    with ctx.sessions() as session:
        assert session.get(Job, job_id).base_version_id == 1
    newer = add_version(ctx, seed=1, activate_it=True)
    with pytest.raises(Exception, match="job"):
        delete_version(ctx, 1)  # the running job's base is kept
    with transaction(ctx.sessions) as session:  # the attempt is lost; the next one starts from what is active then
        session.get(Job, job_id).heartbeat_at = session.get(Job, job_id).heartbeat_at.replace(year=2000)
    retry = claim_job(ctx.sessions, job_id, 3, 60)
    assert claim_base(ctx, job_id, retry, "trained from") == (newer, True)
