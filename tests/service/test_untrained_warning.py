"""While the served version is untrained (version 1 of a fresh model, before its bootstrap job publishes
version 2), generation responses say so with the bootstrap job's progress: a ``warning`` field in
/v1/generate (JSON and the SSE done event) and an ``X-PEER-Warning`` header on /v1/generate,
/v1/completions and /v1/chat/completions. Live service on the embedded SQLite default; the test runs the
jobs itself."""
from __future__ import annotations

import httpx
from sqlalchemy import update

from service.api.app import create_app
from service.context import ServiceContext
from service.db.migrate import upgrade
from service.db.models import Job
from service.db.session import transaction
from service.jobs.ingest import run_ingest_job
from service.jobs.lease import claim_job, heartbeat
from service.jobs.train import run_train_job

from .conftest import ServerThread, domain_text, tiny_settings, wait_for
from .test_api import sse_events

GENERATE = {"prompt": "ROMEO:", "max_tokens": 4}
COMPLETION = {"model": "peer", "prompt": "ROMEO:", "max_tokens": 4}
CHAT = {"model": "peer", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def warnings_seen(http: httpx.Client) -> dict[str, str | None]:
    """The warning as every generation endpoint and GET /v1/status give it."""
    seen = {}
    response = http.post("/v1/generate", json=GENERATE)
    assert response.status_code == 200, response.text
    seen["generate header"] = response.headers.get("x-peer-warning")
    seen["generate body"] = response.json()["warning"]
    with http.stream("POST", "/v1/generate", json={**GENERATE, "stream": True}) as response:
        seen["stream header"] = response.headers.get("x-peer-warning")
        name, done = sse_events(response)[-1]
        assert name == "done"
        seen["stream done event"] = done["warning"]
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        response = http.post(path, json=body)
        assert response.status_code == 200, response.text
        seen[f"{path} header"] = response.headers.get("x-peer-warning")
        with http.stream("POST", path, json={**body, "stream": True}) as response:
            seen[f"{path} stream header"] = response.headers.get("x-peer-warning")
            response.read()
    seen["status"] = http.get("/v1/status").json()["warning"]
    return seen


def test_an_untrained_model_says_so_with_the_bootstrap_jobs_progress_until_version_2_is_served(tmp_path):
    cache = tmp_path / "corpora"
    cache.mkdir()
    (cache / "shakespeare.txt").write_text(domain_text("english"), encoding="utf-8")
    settings = tiny_settings(tmp_path / "home", bootstrap_corpus="shakespeare", corpora_cache_dir=cache,
                             bootstrap_steps=20)
    upgrade(settings.resolved_database_url)
    ctx = ServiceContext.from_settings(settings)
    sent: list[Job] = []
    with ServerThread(create_app(settings, dispatch=sent.append)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        (ingest,) = sent
        expected = f"the model is untrained: bootstrap job {ingest.id} is queued; training follows"
        assert set(warnings_seen(http).values()) == {expected}
        assert http.get("/v1/status").json()["base"] == {"name": "fresh byte-level model", "family": "peer",
                                                         "pretrained": False}

        run_ingest_job(ctx, ingest.id, sent.append)
        train_id = sent[-1].id
        assert set(warnings_seen(http).values()) == {f"the model is untrained: bootstrap job {train_id} is queued"}

        lease = claim_job(ctx.sessions, train_id, settings.job_max_attempts, settings.job_stale_seconds)
        heartbeat(ctx.sessions, train_id, lease, progress=0.375)
        assert set(warnings_seen(http).values()) == {f"the model is untrained: bootstrap job {train_id} is at 37%"}

        with transaction(ctx.sessions) as session:  # hand the job back, as a lost worker's would be
            session.execute(update(Job).where(Job.id == train_id).values(state="queued", lease=None))
        run_train_job(ctx, train_id)
        wait_for(lambda: http.post("/v1/generate", json=GENERATE).json()["version"] == 2, 30, what="version 2")
        assert set(warnings_seen(http).values()) == {None}  # trained: no field value, no header
    ctx.close()
