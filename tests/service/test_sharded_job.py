"""A training job on two processes that share out the expert tables (PEER_TRAIN_NPROC=2, gloo on CPU), as the
worker runs it on PostgreSQL: it publishes a version that learnt the new corpus; cancellation, the worker's
shutdown and a killed stage process end it cleanly, with no stage process or work directory left behind.
(That the sharded stage computes what one process does is tests/test_sharded.py's.)"""
from __future__ import annotations

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
from .test_training_job import ingest, row, upload

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ctx(pg_url, tmp_path_factory):
    ctx = ServiceContext.from_settings(tiny_settings(tmp_path_factory.mktemp("home"), pg_url, train_nproc=2))
    ensure_initial_version(ctx)
    yield ctx
    ctx.close()


def stage_processes() -> list[int]:
    """This test process' running stage processes (service/jobs/sharded_stage.py)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"service.jobs.sharded_stage" in cmdline and ppid == os.getpid():
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


def test_the_batch_must_split_over_the_processes(tmp_path):
    with pytest.raises(ValueError, match="multiple of PEER_TRAIN_NPROC"):
        Settings(home=tmp_path, train_nproc=3, train_batch_size=16)
