"""A training job on two processes that share out the expert tables (PEER_TRAIN_NPROC=2, gloo on CPU), as the
worker runs it on PostgreSQL: it publishes a version that learnt the new corpus; cancellation, the worker's
shutdown and a killed stage process end it cleanly, with no stage process or work directory left behind.
(That the sharded stage computes what one process does is tests/test_sharded.py's.)"""
from __future__ import annotations

import dataclasses
import errno
import os
import signal
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from service.context import ServiceContext
from service.db.models import Job, PoolVersion
from service.db.session import transaction
from service.jobs.lease import create_job, request_cancel
from service.jobs.train import run_train_job
from service.settings import Settings
from service.store.versions import ensure_initial_version

from .conftest import TINY_MODEL, domain_text, tiny_settings, wait_for
from .test_processes import pg_database, processes  # noqa: F401 - fixtures
from .test_training_job import ingest, row, upload

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ctx(pg_url, tmp_path_factory):
    ctx = ServiceContext.from_settings(tiny_settings(tmp_path_factory.mktemp("home"), pg_url, train_nproc=2))
    ensure_initial_version(ctx)
    yield ctx
    ctx.close()


def stage_processes(parent: int | None = None) -> list[int]:
    """The running stage processes (service/jobs/sharded_stage.py) of ``parent`` (default: this test process)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"service.jobs.sharded_stage" in cmdline and ppid == (parent or os.getpid()):
            pids.append(int(entry.name))
    return pids


def work_directories() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("peer-stage-*")}


@pytest.fixture(scope="module")
def versions(ctx):
    """English pre-trains version 1 into 2; code then trains 2 into 3 the default way (replay, distillation,
    growth), each on two processes."""
    english, ingest_english = upload(ctx, "english", domain_text("english"), {"steps": 30})
    run_train_job(ctx, ingest(ctx, ingest_english))
    code, ingest_code = upload(ctx, "code", domain_text("code"), {"steps": 30})
    train_code = ingest(ctx, ingest_code)
    run_train_job(ctx, train_code)
    return english, code, train_code


def test_a_job_on_two_processes_publishes_a_version_that_learnt_the_new_corpus(ctx, versions):
    english, code, train_code = versions
    job = row(ctx, Job, train_code)
    assert job.state == "succeeded", job.error
    assert job.metrics["processes"] == 2 and job.metrics["strategy"] == "replay" and job.metrics["steps"] == 30
    assert job.metrics["loss_history"][-1][0] == 30  # progress came back from the stage processes
    assert job.metrics["bpb"][str(code)] < job.metrics["parent_bpb"][str(code)]
    v3 = row(ctx, PoolVersion, job.result_version_id)
    v2 = row(ctx, PoolVersion, v3.parent_id)
    assert v3.experts["1"] >= v2.experts["1"] + ctx.settings.new_experts  # grown (to whole rows of the grid)
    child = ctx.store.load_model(v3.checkpoint)  # put back together from the processes' columns
    n = v2.experts["1"]
    assert child.peer_layers()[1].expert_down.shape == (v3.experts["1"], TINY_MODEL["d_model"])
    assert not torch.equal(child.peer_layers()[1].expert_up[n:], torch.zeros_like(child.peer_layers()[1].expert_up[n:]))
    assert not stage_processes()


def start_long_job(ctx, corpus: int) -> tuple[int, threading.Thread]:
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", [corpus], {"steps": 100_000}).id
    worker = threading.Thread(target=run_train_job, args=(ctx, job_id))
    worker.start()
    wait_for(lambda: row(ctx, Job, job_id).metrics.get("step"), 120, what="the job to report training steps")
    return job_id, worker


def no_version(ctx, job_id: int) -> bool:
    with ctx.sessions() as session:
        return session.scalar(select(PoolVersion).where(PoolVersion.job_id == job_id)) is None


def test_cancelling_stops_every_stage_process(ctx, versions):
    before = work_directories()
    job_id, worker = start_long_job(ctx, versions[1])
    assert len(stage_processes()) == 2
    with transaction(ctx.sessions) as session:
        assert request_cancel(session, job_id).state == "cancelling"
    worker.join(timeout=120)
    job = row(ctx, Job, job_id)
    assert job.state == "cancelled" and no_version(ctx, job_id)
    assert not stage_processes() and work_directories() <= before


def test_the_workers_shutdown_hands_the_job_back_and_stops_the_stage(ctx, versions):
    job_id, worker = start_long_job(ctx, versions[1])
    ctx.stopping.set()
    try:
        worker.join(timeout=120)
    finally:
        ctx.stopping.clear()
    job = row(ctx, Job, job_id)
    assert job.state == "queued" and job.lease is None and no_version(ctx, job_id)
    assert not stage_processes()
    with transaction(ctx.sessions) as session:
        request_cancel(session, job_id)


def test_a_killed_stage_process_fails_the_job_with_its_reason(ctx, versions):
    before = work_directories()
    job_id, worker = start_long_job(ctx, versions[1])
    os.kill(stage_processes()[-1], signal.SIGKILL)
    worker.join(timeout=120)
    job = row(ctx, Job, job_id)
    assert job.state == "failed" and no_version(ctx, job_id)
    assert "sharded training failed" in job.error and "exit status -9" in job.error
    assert not stage_processes() and work_directories() <= before


def test_a_cancel_ends_the_job_by_its_deadline_when_a_process_is_stuck(ctx, versions):
    """A process that never reaches its next step (here: stopped by SIGSTOP) kept the job "cancelling" for the
    process group's collective timeout (30 minutes); PEER_TRAIN_STOP_GRACE_SECONDS after the stop request the
    processes are killed and the job is cancelled."""
    quick = dataclasses.replace(ctx, settings=ctx.settings.model_copy(update={"train_stop_grace_seconds": 2.0}))
    before = work_directories()
    job_id, worker = start_long_job(quick, versions[1])
    os.kill(stage_processes()[-1], signal.SIGSTOP)
    try:
        with transaction(ctx.sessions) as session:
            assert request_cancel(session, job_id).state == "cancelling"
        worker.join(timeout=60)
        assert not worker.is_alive(), "the job is still waiting for its stuck stage process"
    finally:
        for pid in stage_processes():
            os.kill(pid, signal.SIGKILL)
        worker.join(timeout=60)
    job = row(ctx, Job, job_id)
    assert job.state == "cancelled" and no_version(ctx, job_id)
    assert work_directories() <= before


def test_processes_started_before_one_that_cannot_start_are_stopped(ctx, versions, monkeypatch):
    """Process 0 started, process 1 could not (here: its fork refused): process 0 was left waiting for its group,
    outside every cleanup."""
    from service.jobs import sharded_stage

    start = sharded_stage._start

    def refused(work, rank, size):
        if rank == 1:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable (fork refused)")
        return start(work, rank, size)

    monkeypatch.setattr(sharded_stage, "_start", refused)
    before = work_directories()
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", [versions[1]], {"steps": 5}).id
    try:
        run_train_job(ctx, job_id)
        assert not stage_processes(), "a stage process outlived its job"
    finally:
        for pid in stage_processes():
            os.kill(pid, signal.SIGKILL)
    job = row(ctx, Job, job_id)
    assert job.state == "failed" and "fork refused" in job.error and no_version(ctx, job_id)
    assert work_directories() <= before


def test_a_killed_workers_stage_directory_is_swept_when_a_worker_starts(pg_database, redis_url, processes,
                                                                        tmp_path):
    """A worker killed (SIGKILL, OOM) mid-stage leaves its work directory (the parent's checkpoint, the corpora's
    tokens: the text of corpora deleted later too) in the temporary folder; the next worker removes it."""
    from service.db.migrate import upgrade
    from service.worker.app import dispatcher, make_celery

    from .test_processes import service_env, start

    settings = tiny_settings(tmp_path / "home", pg_database, broker_url=redis_url, train_nproc=2)
    upgrade(pg_database)
    local = ServiceContext.from_settings(settings)
    try:
        ensure_initial_version(local)
        code, ingest_code = upload(local, "swept", domain_text("code"), {"steps": 100_000, "activate": "never"})
        train_id = ingest(local, ingest_code)
        env = service_env(tmp_path / "home", database_url=pg_database, broker_url=redis_url, train_nproc=2)
        worker = start(processes, ["worker", "--queues", "train"], env, tmp_path / "worker1.log")
        with local.sessions() as session:
            dispatcher(make_celery(settings))(session.get(Job, train_id))

        wait_for(lambda: row(local, Job, train_id).metrics.get("step"), 120, what="training steps")
        mine = wait_for(lambda: [Path(tempfile.gettempdir()) / d for d in work_directories()
                                 if _owner_of(Path(tempfile.gettempdir()) / d) == worker.popen.pid], 30,
                        what="the stage's work directory")[0]
        stages = stage_processes(worker.popen.pid)
        assert len(stages) == 2
        worker.stop(signal.SIGKILL)
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in stages), 60,
                 what="the stage processes to stop by themselves")
        assert mine.is_dir()  # nothing cleaned up after a SIGKILL
        start(processes, ["worker", "--queues", "train"], env, tmp_path / "worker2.log")
        wait_for(lambda: not mine.exists(), 60, what="the new worker to sweep the directory")
        with transaction(local.sessions) as session:
            request_cancel(session, train_id)
    finally:
        local.close()


def _owner_of(work: Path) -> int | None:
    """The pid holding a work directory's owner lock (from /proc/locks), or None."""
    try:
        inode = (work / "owner.lock").stat().st_ino
    except OSError:
        return None
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4])
    return None


def test_the_batch_must_split_over_the_processes(tmp_path):
    with pytest.raises(ValueError, match="multiple of PEER_TRAIN_NPROC"):
        Settings(home=tmp_path, train_nproc=3, train_batch_size=16)
