"""Forgetting on request: the forget job on PostgreSQL masks a corpus' segments and publishes a version
without it; the API refuses what cannot be forgotten."""
from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.api.app import create_app
from service.context import ServiceContext
from service.db.models import Evaluation, Job, PoolVersion
from service.db.session import transaction
from service.jobs.forget import run_forget_job
from service.jobs.lease import create_job, request_cancel
from service.jobs.train import run_train_job
from service.store.versions import active_version_id, ensure_initial_version

from .conftest import domain_text, tiny_settings
from .test_training_job import ingest, row, upload


@pytest.fixture(scope="module")
def ctx(pg_url, tmp_path_factory):
    # learning rates at which the tiny model learns both domains within a few dozen steps
    ctx = ServiceContext.from_settings(tiny_settings(tmp_path_factory.mktemp("home"), pg_url, train_lr=1e-2,
                                                     train_expert_lr=3e-2))
    ensure_initial_version(ctx)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def learnt(ctx):
    """English pre-trains the fresh model; code is then learnt into a segment of its own with the dense
    layers and old experts frozen, so what it taught sits in that segment and the routing."""
    english, ingest_english = upload(ctx, "english", domain_text("english"), {"steps": 60})
    run_train_job(ctx, ingest(ctx, ingest_english))
    code, ingest_code = upload(ctx, "code", domain_text("code"),
                               {"activate": "always", "freeze_old_experts": True, "train_dense": False, "steps": 60})
    train_code = ingest(ctx, ingest_code)
    run_train_job(ctx, train_code)
    assert row(ctx, Job, train_code).state == "succeeded"
    return english, code, row(ctx, Job, train_code).result_version_id


def forget(ctx, corpus_id: int, options: dict | None = None) -> Job:
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "forget", [corpus_id], options or {"activate": "always"}).id
    run_forget_job(ctx, job_id)
    return row(ctx, Job, job_id)


def test_forgetting_publishes_a_version_without_the_corpus_and_its_segment_masked(ctx, learnt):
    english, code, learnt_id = learnt
    job = forget(ctx, code)
    assert job.state == "succeeded", job.error
    version = row(ctx, PoolVersion, job.result_version_id)
    assert version.parent_id == learnt_id and version.strategy == "forget" and version.corpus_ids == [english]
    assert [s["status"] for s in version.segments["1"]] == ["active", "masked"]
    assert [s["corpus_ids"] for s in version.segments["1"]] == [[], [code]], "the record of what was masked stays"
    with ctx.sessions() as session:
        assert active_version_id(session) == version.id
        evaluated = set(session.scalars(select(Evaluation.corpus_id).where(Evaluation.version_id == version.id)))
    assert evaluated == {english}
    bpb, parent_bpb = job.metrics["bpb"], job.metrics["parent_bpb"]
    learning = row(ctx, Job, row(ctx, PoolVersion, learnt_id).job_id).metrics
    never, learnt_bpb = learning["parent_bpb"][str(code)], learning["bpb"][str(code)]
    assert learnt_bpb < never - 1.0, "the test needs a version that learnt the code corpus"
    assert parent_bpb[str(code)] == pytest.approx(learnt_bpb)
    assert (bpb[str(code)] - learnt_bpb) / (never - learnt_bpb) > 0.5, "at least half way back to never trained"
    assert job.metrics["masked_segments"] == {"1": [1]}

    model = ctx.store.load_model(version.checkpoint)
    layer = model.peer_layers()[1]
    assert [s.status for s in layer.segments] == ["active", "masked"]
    ids = layer.route(torch.randn(512, model.config.d_model))[1]
    assert not bool((ids >= layer.segments[1].start).any()), "masked experts must be out of reach"


def test_a_forgotten_corpus_cannot_be_forgotten_twice_and_the_lineage_trains_on(ctx, learnt):
    english, code, _ = learnt
    again = forget(ctx, code)
    assert again.state == "failed" and "does not know corpus" in again.error
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", [english], {"steps": 5, "activate": "always"}).id
    run_train_job(ctx, job_id)
    trained = row(ctx, Job, job_id)
    assert trained.state == "succeeded", trained.error
    child = row(ctx, PoolVersion, trained.result_version_id)
    assert child.corpus_ids == [english]
    assert [s["status"] for s in child.segments["1"]][:2] == ["active", "masked"], "a masked segment stays masked"


def test_the_api_refuses_what_cannot_be_forgotten(ctx, learnt):
    english, code, learnt_id = learnt
    sent: list[Job] = []
    with TestClient(create_app(ctx.settings, dispatch=sent.append)) as client:
        shared = client.post(f"/v1/corpora/{english}/forget", json={})
        assert shared.status_code == 409 and "no segment of its own" in shared.json()["detail"]
        assert client.post("/v1/corpora/999999/forget", json={}).status_code == 404
        bad = client.post(f"/v1/corpora/{code}/forget", json={"base_version_id": learnt_id,
                                                              "options": {"repair_steps": -1}})
        assert bad.status_code == 422
        unknown = client.post(f"/v1/corpora/{code}/forget", json={"base_version_id": learnt_id,
                                                                  "options": {"what": 1}})
        assert unknown.status_code == 422
        accepted = client.post(f"/v1/corpora/{code}/forget", json={"base_version_id": learnt_id,
                                                                   "options": {"repair_steps": 3, "activate": "never"}})
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["kind"] == "forget" and [job.id for job in sent] == [accepted.json()["id"]]


def test_forgetting_with_repair_trains_on_the_remaining_corpora(ctx, learnt):
    english, code, learnt_id = learnt

    def forget_from_learnt(repair_steps):
        with transaction(ctx.sessions) as session:
            job_id = create_job(session, "forget", [code], {"repair_steps": repair_steps, "activate": "never"},
                                base_version_id=learnt_id).id
        run_forget_job(ctx, job_id)
        job = row(ctx, Job, job_id)
        assert job.state == "succeeded", job.error
        return job

    plain, repaired = forget_from_learnt(0), forget_from_learnt(30)
    assert repaired.metrics["repair_steps"] == 30 and repaired.metrics["activated"] is False
    assert repaired.metrics["bpb"][str(english)] < plain.metrics["bpb"][str(english)], \
        "repair must win back what the remaining corpus had routed to the masked experts"
    parent = ctx.store.load_model(row(ctx, PoolVersion, learnt_id).checkpoint)
    child = ctx.store.load_model(row(ctx, PoolVersion, repaired.result_version_id).checkpoint)
    start = parent.peer_layers()[1].segments[1].start
    assert torch.equal(child.peer_layers()[1].expert_up[start:], parent.peer_layers()[1].expert_up[start:])


def test_forgetting_goes_on_when_the_corpora_were_deleted(ctx, learnt):
    """Deleting a corpus removes its text; a forget job read it unconditionally and failed on the missing file.
    (Runs last: it deletes the module's corpora.)"""
    from service.store.retention import delete_corpus

    english, code, learnt_id = learnt
    with transaction(ctx.sessions) as session:  # jobs an earlier test submitted and never ran
        for waiting in session.scalars(select(Job.id).where(Job.state == "queued")).all():
            request_cancel(session, waiting)
    for corpus_id in (english, code):
        delete_corpus(ctx, corpus_id)
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "forget", [code], {"repair_steps": 10, "activate": "never"},
                            base_version_id=learnt_id).id
    run_forget_job(ctx, job_id)
    job = row(ctx, Job, job_id)
    assert job.state == "succeeded", job.error
    assert job.metrics["repair_steps"] == 0 and job.metrics["bpb"] == {}  # nothing left to repair on or measure
    assert "its text is deleted" in job.metrics["gate"]
    assert [s["status"] for s in row(ctx, PoolVersion, job.result_version_id).segments["1"]] == ["active", "masked"]
