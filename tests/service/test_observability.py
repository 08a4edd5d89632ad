"""Observability: JSON log lines carrying the request id (API) and the job id (workers), unhandled exceptions as
JSON 500s counted by route and exception type, generation histograms fed by real generations, the oldest
queued job's age, worker metrics on their own port, and /metrics answering while the database is down."""
from __future__ import annotations

import io
import json
import logging
import re
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.db.migrate import upgrade
from service.db.models import utcnow
from service.db.session import transaction
from service.jobs.lease import create_job
from service.logs import make_handler

from .conftest import PG_HOST, create_pg_database, domain_text, drop_pg_database, free_port, tiny_settings, wait_for
from .test_processes import http, processes, service_env, start, wait_ready  # noqa: F401 - processes: a fixture


def metric(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text format (None when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, label_text = sample.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if sample_name == name and found == {k: str(v) for k, v in labels.items()}:
            return float(value)
    return None


@pytest.fixture()
def json_log():
    """Every log record of this process, formatted by the service's JSON handler, as parsed objects."""
    buffer = io.StringIO()
    handler = make_handler("json", buffer)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture()
def app(tmp_path):
    settings = tiny_settings(tmp_path)
    upgrade(settings.resolved_database_url)
    app = create_app(settings, dispatch=lambda job: None)
    quiet = logging.getLogger("tests.observability")

    @app.get("/test/boom/{item}")
    def boom(item: int):  # a route with a bug, as a test app's
        quiet.info("about to fail on item %s", item)
        raise ZeroDivisionError("division by zero")

    return app


def test_an_unhandled_exception_is_a_json_500_with_the_request_id_logged_and_counted(app, json_log):
    with TestClient(app) as client:
        response = client.get("/test/boom/7", headers={"X-Request-Id": "req-boom-1"})
        assert response.status_code == 500
        body = response.json()
        assert body["request_id"] == "req-boom-1" == response.headers["x-request-id"]
        assert body["error"]["type"] == "InternalError" and "req-boom-1" in body["detail"]
        assert "division by zero" not in response.text  # the cause is logged, not shown
        generated = client.get("/test/boom/8")  # no id given: one is made, and it is the one logged
        assert generated.status_code == 500 and generated.json()["request_id"] == generated.headers["x-request-id"]
        text = client.get("/metrics").text
    assert metric(text, "peer_http_server_errors_total", route="/test/boom/{item}", exception="ZeroDivisionError") == 2
    assert metric(text, "peer_http_requests_total", method="GET", route="/test/boom/{item}", status="500") == 2
    lines = json_log()
    mine = [line for line in lines if line.get("request_id") == "req-boom-1"]
    assert [line["message"] for line in mine][:1] == ["about to fail on item 7"]  # the route's own line has it
    error = next(line for line in mine if line["level"] == "ERROR")
    assert "ZeroDivisionError" in error["exception"] and error["logger"] == "service.api.app"
    assert any(line.get("request_id") == generated.json()["request_id"] for line in lines)


def test_a_request_id_that_is_not_a_plain_token_is_replaced(app):
    with TestClient(app) as client:
        response = client.get("/healthz", headers={"X-Request-Id": "x" * 200})
    assert response.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_generation_histograms_are_fed_by_real_generations(app):
    with TestClient(app) as client:
        before = client.get("/metrics").text
        assert metric(before, "peer_generation_seconds_count") == 0
        answer = client.post("/v1/generate", json={"prompt": "the", "max_tokens": 6, "temperature": 0, "seed": 1})
        assert answer.status_code == 200, answer.text
        tokens = answer.json()["completion_tokens"]
        with client.stream("POST", "/v1/generate", json={"prompt": "a", "max_tokens": 5, "seed": 2,
                                                          "stream": True}) as streamed:
            done = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: ")][-1]
        text = client.get("/metrics").text
    streamed_tokens = done["completion_tokens"]
    assert metric(text, "peer_generation_seconds_count") == 2
    assert metric(text, "peer_time_to_first_token_seconds_count") == 2
    assert metric(text, "peer_inter_token_seconds_count") == tokens - 1 + streamed_tokens - 1
    assert 0 < metric(text, "peer_inter_token_seconds_sum") < metric(text, "peer_generation_seconds_sum")
    assert metric(text, "process_resident_memory_bytes") > 0


@pytest.fixture()
def doomed_database():
    """A PostgreSQL database of this test's own, which the test may drop while the service uses it."""
    name = create_pg_database()
    url = f"postgresql+psycopg://{PG_HOST}/{name}"
    upgrade(url)
    yield name, url
    drop_pg_database(name)


def test_metrics_reads_the_oldest_queued_job_and_answers_with_the_database_down(doomed_database, tmp_path):
    name, url = doomed_database
    app = create_app(tiny_settings(tmp_path, url), dispatch=lambda job: None)
    with TestClient(app) as client:
        with transaction(app.state.ctx.sessions) as session:
            job = create_job(session, "train", [], {})
            job.created_at = utcnow() - timedelta(seconds=90)
        text = client.get("/metrics").text
        assert metric(text, "peer_database_up") == 1
        assert metric(text, "peer_jobs", kind="train", state="queued") == 1
        assert 90 <= metric(text, "peer_oldest_queued_job_seconds") < 300

        drop_pg_database(name)  # the database goes away under the running service
        down = client.get("/metrics")
        assert down.status_code == 200
        assert metric(down.text, "peer_database_up") == 0
        assert metric(down.text, "peer_jobs", kind="train", state="queued") is None  # no stale values
        assert metric(down.text, "peer_oldest_queued_job_seconds") is None
        assert metric(down.text, "process_resident_memory_bytes") > 0
        assert metric(down.text, "peer_http_requests_total", method="GET", route="/metrics", status="200") >= 1


def test_readyz_tells_no_database_error_text_to_the_caller(doomed_database, tmp_path, caplog):
    """/readyz needs no key: the driver's message (host, user, database names) goes to the log, not the answer."""
    name, url = doomed_database
    with TestClient(create_app(tiny_settings(tmp_path, url), dispatch=lambda job: None)) as client:
        drop_pg_database(name)
        with caplog.at_level("WARNING"):
            ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error")
    assert name not in ready.text and "psycopg" not in ready.text.lower() and "postgres" not in ready.text.lower()
    assert any(name in record.getMessage() for record in caplog.records if record.name.endswith("health"))


def free_port_pair() -> int:
    """A free port whose successor is free too."""
    import socket

    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def test_serve_logs_json_with_request_and_job_ids_and_workers_serve_their_metrics(processes, tmp_path):
    """The real processes: ``peer-service serve`` (API + two workers) logging JSON by default."""
    metrics_port = free_port_pair()  # the ingest worker's, and the train worker's one above
    port = next(p for p in iter(free_port, None) if p not in (metrics_port, metrics_port + 1))
    env = service_env(tmp_path / "home", worker_metrics_port=metrics_port)
    serve = start(processes, ["--log-level", "INFO", "serve", "--port", str(port)], env, tmp_path / "serve.log")
    with http(port) as client:
        wait_ready(client, serve)
        accepted = client.post("/v1/corpora", params={"name": "english", "train": "false"},
                               content=domain_text("english", 50), headers={"content-type": "text/plain",
                                                                             "X-Request-Id": "upload-42"})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job"]["id"]
        wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded", 60, what="the ingest job")

    def scraped():  # the ingest worker (the first of serve's workers) serves on the port given, the train one on +1
        try:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        except httpx.TransportError:
            return None
        return text if metric(text, "peer_worker_jobs_total", kind="ingest", outcome="succeeded") == 1 else None

    text = wait_for(scraped, 30, interval=0.3, what="the ingest worker's metrics")
    assert metric(text, "peer_worker_current_job", kind="ingest") == 0
    assert metric(text, "peer_worker_job_seconds_count", kind="ingest") == 1
    assert metric(httpx.get(f"http://127.0.0.1:{metrics_port + 1}/metrics").text,
                  "peer_worker_train_tokens_per_second") == 0  # the train worker: no job yet

    lines = [line for line in serve.log.read_text().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert len(entries) > 10 and all({"ts", "level", "logger", "message"} <= entry.keys() for entry in entries)
    assert any(e.get("request_id") == "upload-42" and e["logger"] == "uvicorn.access" for e in entries)
    job_messages = [e["message"] for e in entries if e.get("job_id") == job_id]
    assert f"ingest job {job_id}: delivered" in job_messages
    assert any(m.startswith(f"ingest job {job_id}: succeeded after") for m in job_messages)


def test_the_inline_workers_log_lines_carry_the_job_id(tmp_path, json_log):
    """serve's embedded tests and demos run jobs in a thread (InlineWorker): a failing job's lines name it too."""
    from service.context import ServiceContext
    from service.db.models import Corpus
    from service.store.versions import ensure_initial_version
    from service.worker.inline import InlineWorker

    settings = tiny_settings(tmp_path)
    upgrade(settings.resolved_database_url)
    ctx = ServiceContext.from_settings(settings)
    try:
        ensure_initial_version(ctx)
        with transaction(ctx.sessions) as session:  # ready, but its text is not in the store: the job fails
            corpus = Corpus(name="gone", source="upload", state="ready", sha256="0" * 64, raw_bytes=1, documents=1)
            session.add(corpus)
            session.flush()
            job = create_job(session, "train", [corpus.id], {})
        with InlineWorker(settings) as worker:
            worker.dispatch(job)
            worker.join()
    finally:
        ctx.close()
    failures = [e for e in json_log() if e["message"] == f"job {job.id} failed"]
    assert failures and all(e["job_id"] == job.id for e in failures)


def test_a_worker_whose_metrics_port_is_taken_still_runs_its_watchdog(processes, tmp_path):
    """The metrics server failing to bind must not take the watchdog with it (it did: the handler raised
    before starting it, and jobs never sent waited for ever): a job recorded but never sent is sent by the
    watchdog's first pass and runs."""
    import socket

    from service.context import ServiceContext
    from service.db.models import Corpus, Job
    from service.jobs.ingest import parse_upload
    from service.jobs.uploads import accept_corpus

    home = tmp_path / "home"
    settings = tiny_settings(home)
    upgrade(settings.resolved_database_url)
    ctx = ServiceContext.from_settings(settings)
    text = domain_text("english")
    with transaction(ctx.sessions) as session:  # recorded, never dispatched (as with the broker down)
        corpus, job = accept_corpus(ctx, session, "english", parse_upload(text.encode(), "text", len(text.encode())),
                                    text, "text", False, {})
        corpus_id, job_id = corpus.id, job.id
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = service_env(home, worker_metrics_port=taken.getsockname()[1])
        worker = start(processes, ["worker", "--queues", "ingest"], env, tmp_path / "worker.log")

        def ingested():
            assert worker.popen.poll() is None, worker.tail()
            with ctx.sessions() as session:
                return session.get(Job, job_id).state == "succeeded" and session.get(Corpus, corpus_id).state == "ready"

        wait_for(ingested, 60, interval=0.3, what="the never-sent ingest job to run")
    ctx.close()
    assert "worker metrics not served" in worker.tail()
