"""The REST API in process (TestClient), on PostgreSQL, with a real Celery worker thread on Redis."""
from __future__ import annotations

import json

import pytest
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient

from peer_model.generate import SamplingParams, generate_text
from peer_model.tokenizer import ByteTokenizer
from service.api.app import create_app
from service.store.store import Store
from service.worker.app import dispatcher, make_celery

from .conftest import REDIS_URL, domain_text, tiny_settings, wait_for

CORPUS_LIMIT = 100_000


@pytest.fixture(scope="module")
def settings(pg_url, tmp_path_factory):
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    return tiny_settings(tmp_path_factory.mktemp("home"), pg_url, REDIS_URL, max_corpus_bytes=CORPUS_LIMIT,
                         max_tokens_limit=64, stream_train_threshold_bytes=3000)


@pytest.fixture(scope="module")
def client(settings):
    celery_app = make_celery(settings)
    with start_worker(celery_app, pool="solo", perform_ping_check=False, queues=["ingest", "train"],
                      shutdown_timeout=30):
        with TestClient(create_app(settings, dispatch=dispatcher(celery_app))) as client:
            yield client


def ok(response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    return response.json()


def active_version(client) -> dict:
    return next(v for v in ok(client.get("/v1/versions")) if v["active"])


def wait_job(client, job_id: int, timeout: float = 120) -> dict:
    return wait_for(lambda: (lambda j: j if j["state"] in ("succeeded", "failed", "cancelled") else None)(
        ok(client.get(f"/v1/jobs/{job_id}"))), timeout, interval=0.2, what=f"job {job_id}")


def sse_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


@pytest.fixture(scope="module")
def trained(client):
    """Upload an English corpus; the ingest job starts a training job that publishes version 2."""
    accepted = ok(client.post("/v1/corpora", json={"name": "english", "text": domain_text("english"),
                                                   "train_options": {"steps": 30}}), 202)
    assert accepted["corpus"]["state"] == "pending" and accepted["job"]["kind"] == "ingest"
    ingest = wait_job(client, accepted["job"]["id"])
    assert ingest["state"] == "succeeded", ingest["error"]
    train = wait_job(client, ingest["next_job_id"])
    assert train["state"] == "succeeded", train["error"]
    return accepted["corpus"]["id"], train


def test_the_uploaded_corpus_becomes_the_served_version(client, trained):
    corpus_id, train = trained
    version = active_version(client)
    assert version["id"] == train["result_version_id"] and version["corpus_ids"] == [corpus_id]
    assert set(version["evaluation"]) == {str(corpus_id)}
    assert ok(client.get(f"/v1/corpora/{corpus_id}"))["state"] == "ready"
    served = wait_for(lambda: (lambda r: r if r["version"] == version["id"] else None)(
        ok(client.post("/v1/generate", json={"prompt": "the", "max_tokens": 4}))), 10, what="the hot swap")
    assert served["completion_tokens"] >= 1


def test_generation_equals_the_library_on_the_served_checkpoint(client, settings, trained):
    response = client.post("/v1/generate", json={"prompt": "the cat", "max_tokens": 24, "temperature": 0},
                           headers={"X-Request-Id": "req-42"})
    body = ok(response)
    assert response.headers["x-request-id"] == "req-42"
    version = ok(client.get(f"/v1/versions/{body['version']}"))
    model = Store(settings.resolved_store_dir).load_model(version["checkpoint"])
    expected = generate_text(model, ByteTokenizer(), "the cat", SamplingParams(max_tokens=24, temperature=0))
    assert body["text"] == expected.text and body["finish_reason"] == expected.finish_reason
    assert body["prompt_tokens"] == 7 and body["completion_tokens"] == expected.completion_tokens


def test_streaming_sends_the_same_tokens_as_json_and_ends_with_done(client, trained):
    request = {"prompt": "a dog", "max_tokens": 20, "temperature": 1.0, "top_k": 20, "seed": 3}
    whole = ok(client.post("/v1/generate", json=request))
    with client.stream("POST", "/v1/generate", json={**request, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert [name for name, _ in events[:-1]] == ["token"] * (len(events) - 1)
    assert "".join(data["text"] for _, data in events[:-1]) == whole["text"]
    name, done = events[-1]
    assert name == "done" and done["completion_tokens"] == whole["completion_tokens"]
    assert done["version"] == whole["version"]


@pytest.mark.parametrize("body, words", [
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 65}, "limit is 64"),
    ({"prompt": "x", "stop": ["s"] * 17}, "at most 16 stop strings"),
    ({"prompt": "x" * 64}, "does not fit the context window of 64 tokens"),
    ({"max_tokens": 3}, "prompt"),
])
def test_invalid_generation_requests_are_422_with_a_message(client, body, words):
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 422 and words in response.json()["detail"]


def corpus_count(client) -> int:
    return len(ok(client.get("/v1/corpora", params={"limit": 1000})))


@pytest.mark.parametrize("kwargs, status, words", [
    (dict(content=b"caf\xe9", headers={"content-type": "text/plain"}, params={"name": "latin1"}), 422, "UTF-8"),
    (dict(content=b" \n ", headers={"content-type": "text/plain"}, params={"name": "blank"}), 422, "empty"),
    (dict(content=b"x" * (CORPUS_LIMIT + 1), headers={"content-type": "text/plain"}, params={"name": "big"}),
     413, "limit"),
    (dict(json={"name": "none"}), 422, "exactly one"),
    (dict(json={"name": "bad", "text": "ok", "train_options": {"strategy": "magic"}}), 422, "strategy"),
    (dict(content=b'{"text": 1}\n', headers={"content-type": "application/jsonl"}, params={"name": "j"}), 422,
     "string field"),
    (dict(content=b"<xml/>", headers={"content-type": "application/xml"}, params={"name": "x"}), 422,
     "unsupported content type"),
    (dict(content=b"text", headers={"content-type": "text/plain"}), 422, "needs a name"),
])
def test_bad_corpora_are_refused_and_nothing_is_stored(client, kwargs, status, words):
    before = corpus_count(client)
    response = client.post("/v1/corpora", **kwargs)
    assert response.status_code == status and words in response.json()["detail"], response.text
    assert corpus_count(client) == before


def test_multipart_and_jsonl_uploads_are_ingested(client):
    files = {"file": ("notes.txt", "first note\n\nsecond note\n\nfirst note\n".encode(), "text/plain")}
    accepted = ok(client.post("/v1/corpora", files=files, data={"train": "false"}), 202)
    assert accepted["corpus"]["name"] == "notes.txt"
    job = wait_job(client, accepted["job"]["id"])
    assert job["state"] == "succeeded" and job["next_job_id"] is None
    assert job["metrics"] == {"documents": 1, "paragraphs": 2, "duplicates_removed": 1}
    lines = b'{"text": "alpha beta"}\n{"text": "gamma"}\n'
    accepted = ok(client.post("/v1/corpora", content=lines, params={"name": "docs", "train": "false"},
                              headers={"content-type": "application/jsonl"}), 202)
    assert accepted["corpus"]["documents"] == 2
    assert wait_job(client, accepted["job"]["id"])["state"] == "succeeded"


def test_a_stream_starts_training_when_its_untrained_text_passes_the_threshold(client):
    first = ok(client.post("/v1/streams/news/documents", json={"documents": ["short item one", "item two"]}), 202)
    assert first["flushed"] is None and first["stream"]["pending_documents"] == 2
    big = [domain_text("code", 250, seed=s) for s in range(3)]  # > 3000 bytes in all
    second = ok(client.post("/v1/streams/news/documents", json={"documents": big}), 202)
    flushed = second["flushed"]
    assert flushed["corpus"]["source"] == "stream" and flushed["corpus"]["documents"] == 5
    assert second["stream"]["pending_documents"] == 0 and second["stream"]["total_documents"] == 5
    assert ok(client.get("/v1/streams/news"))["corpus_ids"] == [flushed["corpus"]["id"]]
    response = client.post("/v1/streams/news/flush")
    assert response.status_code == 409 and "no untrained documents" in response.json()["detail"]
    ok(client.post("/v1/jobs/{}/cancel".format(wait_job(client, flushed["job"]["id"])["next_job_id"])))


@pytest.mark.parametrize("path", ["/v1/corpora/999999", "/v1/versions/999999", "/v1/jobs/999999",
                                  "/v1/streams/nope", "/v1/experts/utilization?version=999999",
                                  "/v1/experts/0/1"])
def test_unknown_ids_are_404(client, path):
    response = client.get(path)
    assert response.status_code == 404 and response.json()["detail"]


def test_job_submission_errors(client, trained):
    corpus_id, _ = trained
    assert client.post("/v1/jobs", json={"corpus_ids": [999999]}).status_code == 404
    response = client.post("/v1/jobs", json={"corpus_ids": [corpus_id], "options": {"replay_fraction": 2}})
    assert response.status_code == 422 and "replay_fraction" in response.json()["detail"]
    response = client.post("/v1/jobs", json={"corpus_ids": [corpus_id], "options": {"epochs": 2}})
    assert response.status_code == 422 and "epochs: Extra inputs are not permitted" in response.json()["detail"]
    finished = trained[1]["id"]
    assert client.post(f"/v1/jobs/{finished}/cancel").status_code == 409


def test_rollback_by_activation_changes_the_served_version(client, trained):
    current = active_version(client)["id"]
    body = ok(client.post(f"/v1/versions/{current}/activate".replace(str(current), "1"), json={"reason": "rollback"}))
    assert body["active"] and body["activations"][-1]["reason"] == "rollback"
    assert ok(client.post("/v1/generate", json={"prompt": "a", "max_tokens": 2}))["version"] == 1
    ok(client.post(f"/v1/versions/{current}/activate"))
    assert ok(client.post("/v1/generate", json={"prompt": "a", "max_tokens": 2}))["version"] == current


def test_expert_usage_while_serving_is_stored_per_version(client, trained):
    # the version that served (a stream's job from an earlier test may still activate a new one meanwhile)
    version = [ok(client.post("/v1/generate", json={"prompt": "the bird", "max_tokens": 16, "seed": seed}))["version"]
               for seed in range(3)][-1]
    report = wait_for(lambda: (lambda r: r if r["layers"]["1"]["tokens"] > 0 else None)(
        ok(client.get("/v1/experts/utilization", params={"version": version, "layer": 1, "bins": 4}))), 10,
        what="usage to be flushed")
    layer = report["layers"]["1"]
    assert 0 < layer["experts_used"] <= layer["num_experts"] and layer["total_selections"] > 0
    assert sum(map(sum, layer["heatmap"])) == layer["total_selections"]
    assert sum(s["selections"] for s in layer["segments"]) == layer["total_selections"]
    hot_id, hot_count = layer["hottest"][0]
    expert = ok(client.get(f"/v1/experts/1/{hot_id}", params={"version": version}))
    assert expert["selections"] == hot_count and expert["rank"] == 1
    assert client.get("/v1/experts/1/100000").status_code == 422


def test_health_readiness_and_metrics(client, trained):  # trained: a train job for the job gauges
    assert ok(client.get("/healthz")) == {"status": "ok"}
    ready = ok(client.get("/readyz"))
    assert ready["ready"] and ready["checks"]["database"] == "ok" and ready["checks"]["model"].startswith("ok")
    text = client.get("/metrics").text
    for name in ("peer_http_requests_total", "peer_http_request_seconds_bucket", "peer_tokens_generated_total",
                 "peer_generation_queue_depth", "peer_active_version", 'peer_jobs{kind="train"'):
        assert name in text
    tokens = ok(client.post("/v1/tokenize", json={"text": "hé"}))
    assert tokens == {"tokens": [104, 195, 169], "count": 3, "version": tokens["version"], "tokenizer": "byte",
                      "bos": 256, "add_bos": True}


def test_mutating_endpoints_need_a_key_when_keys_are_configured(settings):
    keyed = settings.model_copy(update={"api_keys": ["s3cret"]})
    with TestClient(create_app(keyed, dispatch=lambda job: None)) as client:
        body = {"name": "k", "text": "some text", "train": False}
        assert client.post("/v1/corpora", json=body).status_code == 401
        assert client.post("/v1/corpora", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/corpora", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 202
        assert client.get("/v1/corpora").status_code == 200
        assert client.post("/v1/generate", json={"prompt": "a", "max_tokens": 1}).status_code == 200
