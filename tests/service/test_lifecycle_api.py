"""The lifecycle routes over HTTP (DELETE versions and corpora, pin/unpin; admin scope) on PostgreSQL and
SQLite, and the whole loop on PostgreSQL with a worker: retention after each publish, a deleted corpus
replayed from the parent's own samples by the next job."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.context import ServiceContext
from service.db.migrate import upgrade
from service.db.models import Corpus
from service.db.session import transaction
from service.worker.inline import InlineWorker

from .conftest import PG_HOST, create_pg_database, domain_text, drop_pg_database, tiny_settings, wait_for
from .test_lifecycle import publish

ADMIN = {"Authorization": "Bearer adm"}
READER = {"Authorization": "Bearer rd"}
KEYS = ["admin:adm:admin+read+train", "reader:rd:read"]


def ok(response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    return response.json()


@pytest.fixture()
def fresh_pg_url():
    """A PostgreSQL database of this test's own (version 1 of another test lives in another store)."""
    name = create_pg_database()
    yield f"postgresql+psycopg://{PG_HOST}/{name}"
    drop_pg_database(name)


@pytest.fixture(params=["postgresql", "sqlite"])
def settings(request, tmp_path):
    url = request.getfixturevalue("fresh_pg_url") if request.param == "postgresql" else None
    settings = tiny_settings(tmp_path / "home", url, api_keys=KEYS)
    upgrade(settings.resolved_database_url)
    return settings


def test_versions_are_pinned_and_deleted_through_the_api(settings):
    with InlineWorker(settings) as worker, TestClient(create_app(settings, dispatch=worker.dispatch)) as client:
        active = next(v for v in ok(client.get("/v1/versions", headers=READER)) if v["active"])["id"]
        ctx = ServiceContext.from_settings(settings)
        other = publish(ctx, grow=16)
        with transaction(ctx.sessions) as session:
            corpus = Corpus(name="ready", source="upload", state="ready", sha256="0" * 64, raw_bytes=1, documents=1)
            session.add(corpus)
        ctx.close()

        assert ok(client.delete(f"/v1/versions/{other}"), 401)
        assert "lacks the 'admin' scope" in ok(client.delete(f"/v1/versions/{other}", headers=READER), 403)["detail"]
        assert "active version" in ok(client.delete(f"/v1/versions/{active}", headers=ADMIN), 409)["detail"]
        assert ok(client.post(f"/v1/versions/{other}/pin", headers=ADMIN))["pinned"] is True
        assert "pinned" in ok(client.delete(f"/v1/versions/{other}", headers=ADMIN), 409)["detail"]
        assert ok(client.post(f"/v1/versions/{other}/unpin", headers=ADMIN))["pinned"] is False

        deleted = ok(client.delete(f"/v1/versions/{other}", headers=ADMIN))
        assert deleted["deleted_at"] is not None and not (settings.resolved_store_dir / deleted["checkpoint"]).exists()
        assert ok(client.get(f"/v1/versions/{other}", headers=READER))["deleted_at"] == deleted["deleted_at"]
        for response in (client.post(f"/v1/versions/{other}/activate", headers=ADMIN),
                         client.post(f"/v1/versions/{other}/pin", headers=ADMIN),
                         client.post("/v1/jobs", headers=ADMIN, json={"corpus_ids": [corpus.id],
                                                                      "base_version_id": other}),
                         client.post(f"/v1/corpora/{corpus.id}/forget", headers=ADMIN, json={"base_version_id": other})):
            assert "was deleted" in ok(response, 409)["detail"]
        assert ok(client.delete("/v1/versions/999999", headers=ADMIN), 404)
        assert ok(client.delete("/v1/corpora/999999", headers=ADMIN), 404)
        # the active version was never touched
        assert next(v for v in ok(client.get("/v1/versions", headers=READER)) if v["active"])["id"] == active


def wait_job(client, job_id: int, timeout: float = 180) -> dict:
    return wait_for(lambda: (lambda j: j if j["state"] in ("succeeded", "failed", "cancelled") else None)(
        ok(client.get(f"/v1/jobs/{job_id}"))), timeout, interval=0.2, what=f"job {job_id}")


def upload_and_train(client, name: str, domain: str) -> dict:
    accepted = ok(client.post("/v1/corpora", json={"name": name, "text": domain_text(domain),
                                                   "train_options": {"activate": "always"}}), 202)
    ingest = wait_job(client, accepted["job"]["id"])
    assert ingest["state"] == "succeeded", ingest["error"]
    train = wait_job(client, ingest["next_job_id"])
    assert train["state"] == "succeeded", train["error"]
    return {"corpus": accepted["corpus"]["id"], "job": train}


def test_retention_after_publishing_and_training_after_a_corpus_is_deleted(fresh_pg_url, tmp_path):
    settings = tiny_settings(tmp_path / "home", fresh_pg_url, keep_versions=1)
    upgrade(fresh_pg_url)
    with InlineWorker(settings) as worker, TestClient(create_app(settings, dispatch=worker.dispatch)) as client:
        first = ok(client.get(f"/v1/versions/{ok(client.get('/v1/versions'))[0]['id']}"))
        english = upload_and_train(client, "english", "english")
        second = english["job"]["result_version_id"]
        worker.join()  # the job's last act, after its success is recorded
        # retention right after the publish: the new version is active and the newest, the first goes
        assert ok(client.get(f"/v1/versions/{first['id']}"))["deleted_at"] is not None
        assert not (settings.resolved_store_dir / first["checkpoint"]).exists()

        corpus = ok(client.delete(f"/v1/corpora/{english['corpus']}"))
        assert corpus["state"] == "deleted" and corpus["deleted_at"] is not None
        assert not (settings.resolved_store_dir / "corpora" / str(english["corpus"])).exists()
        assert "not ingested" in ok(client.post("/v1/jobs", json={"corpus_ids": [english["corpus"]]}), 409)["detail"]

        code = upload_and_train(client, "code", "code")
        worker.join()
        metrics = code["job"]["metrics"]
        assert metrics["corpora_gone"] == [english["corpus"]] and metrics["replay_source"] == "parent"
        versions = {v["id"]: v for v in ok(client.get("/v1/versions"))}
        assert versions[code["job"]["result_version_id"]]["active"]
        assert versions[second]["deleted_at"] is not None
