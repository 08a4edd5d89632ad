"""End to end with the real processes: ``peer-service api`` + ``peer-service worker`` on PostgreSQL and
Redis (a worker SIGKILLed mid-job included), and ``peer-service serve``, the embedded default."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import REDIS_URL, TINY_MODEL, TINY_TRAINING, create_pg_database, domain_text, drop_pg_database, \
    free_port, wait_for, PG_HOST


def service_env(home: Path, **settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEER_")}
    values = {**TINY_MODEL, **TINY_TRAINING, "home": home, **settings}
    env.update({f"PEER_{name.upper()}": str(value) for name, value in values.items()})
    return env


class Process:
    """A ``python -m service.cli`` subprocess with its output in a log file shown when a test fails."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.file = open(log, "wb")
        self.popen = subprocess.Popen([sys.executable, "-m", "service.cli", "--log-level", "WARNING", *args],
                                      env=env, stdout=self.file, stderr=subprocess.STDOUT)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.file.close()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture()
def processes():
    """Processes started by the test, stopped after it; their logs appear in a failing test's output."""
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.stop()
        print(f"---- {' '.join(process.popen.args[3:])}\n{process.tail()}")


def start(processes, args, env, log) -> Process:
    process = Process(args, env, log)
    processes.append(process)
    return process


def http(port: int) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)


def wait_ready(client: httpx.Client, process: Process) -> None:
    def ready():
        assert process.popen.poll() is None, f"the process exited:\n{process.tail()}"
        try:
            return client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 120, interval=0.3, what="/readyz")


def job(client: httpx.Client, job_id: int) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def finished(client: httpx.Client, job_id: int, timeout: float = 120) -> dict:
    return wait_for(lambda: (lambda j: j if j["state"] in ("succeeded", "failed", "cancelled") else None)(
        job(client, job_id)), timeout, interval=0.3, what=f"job {job_id} to finish")


def upload_and_train(client: httpx.Client, steps: int) -> dict:
    accepted = client.post("/v1/corpora", json={"name": "english", "text": domain_text("english"),
                                                "train_options": {"steps": steps}})
    assert accepted.status_code == 202, accepted.text
    ingest = finished(client, accepted.json()["job"]["id"])
    assert ingest["state"] == "succeeded", ingest
    train = finished(client, ingest["next_job_id"])
    assert train["state"] == "succeeded", train
    return train


def served_by(client: httpx.Client, version: int) -> dict:
    return wait_for(lambda: (lambda r: r if r["version"] == version else None)(
        client.post("/v1/generate", json={"prompt": "the", "max_tokens": 8}).json()), 30, what=f"version {version}")


@pytest.fixture()
def pg_database():
    name = create_pg_database()
    yield f"postgresql+psycopg://{PG_HOST}/{name}"
    drop_pg_database(name)


def test_distributed_processes_train_serve_and_survive_a_killed_worker(pg_database, redis_url, processes, tmp_path):
    env = service_env(tmp_path, database_url=pg_database, broker_url=redis_url, job_stale_seconds=3,
                      job_watchdog_seconds=1)
    assert subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, capture_output=True).returncode == 0
    port = free_port()
    api = start(processes, ["api", "--port", str(port)], env, tmp_path / "api.log")
    worker = start(processes, ["worker"], env, tmp_path / "worker1.log")
    with http(port) as client:
        wait_ready(client, api)
        train = upload_and_train(client, steps=30)
        version = train["result_version_id"]
        served_by(client, version)
        usage = wait_for(lambda: (lambda r: r if r["layers"]["1"]["tokens"] > 0 else None)(
            client.get("/v1/experts/utilization").json()), 30, what="expert usage")
        assert usage["version"] == version and usage["layers"]["1"]["experts_used"] > 0

        # SIGKILL the worker in the middle of a training job
        corpus_id = train["corpus_ids"][0]
        submitted = client.post("/v1/jobs", json={"corpus_ids": [corpus_id], "options": {"steps": 400}})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        running = wait_for(lambda: (lambda j: j if j["metrics"].get("step") or j["state"] != "running" and
                                    j["state"] != "queued" else None)(job(client, job_id)), 60, what="training steps")
        assert running["state"] == "running", running
        for seed in range(3):  # generation goes on while the job trains
            answer = client.post("/v1/generate", json={"prompt": "the", "max_tokens": 8, "seed": seed})
            assert answer.status_code == 200 and answer.json()["version"] == version
        worker.stop(signal.SIGKILL)
        assert job(client, job_id)["state"] == "running"  # as the dead worker left it
        assert all(v["job_id"] != job_id for v in client.get("/v1/versions").json())  # no half version
        start(processes, ["worker"], env, tmp_path / "worker2.log")
        retried = finished(client, job_id, timeout=180)
        assert retried["state"] == "succeeded" and retried["attempts"] == 2, retried
        assert [v["job_id"] for v in client.get("/v1/versions").json()].count(job_id) == 1


def test_serve_runs_the_whole_loop_on_the_embedded_default(processes, tmp_path):
    port = free_port()
    env = service_env(tmp_path / "home")
    serve = start(processes, ["serve", "--port", str(port)], env, tmp_path / "serve.log")
    with http(port) as client:
        wait_ready(client, serve)
        assert client.get("/docs").status_code == 200
        assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/generate", "/v1/completions", "/v1/corpora"}
        train = upload_and_train(client, steps=20)
        served_by(client, train["result_version_id"])
    assert (tmp_path / "home" / "peer.db").exists() and (tmp_path / "home" / "store").is_dir()


def peak_rss_mb(pid: int) -> float:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM")) / 1024


def rss_mb(pid: int) -> float:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")) / 1024


def test_json_documents_cost_the_api_memory_in_proportion_to_their_body(processes, tmp_path):
    """JSON documents were parsed into a list, re-encoded as JSONL, decoded and parsed again: 4.6 MiB of
    two-character documents raised the API's peak memory by 150 MB (33 times the body). They are now read one at
    a time, counted and checked as they go (service/api/corpus_body.py)."""
    import json

    env = service_env(tmp_path / "home", max_corpus_documents=1_000_000)
    assert subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, capture_output=True).returncode == 0
    port = free_port()
    api = start(processes, ["api", "--port", str(port)], env, tmp_path / "api.log")
    with http(port) as client:
        wait_ready(client, api)
        pid = api.popen.pid
        for documents, status in ((800_000, 202), (1_600_000, 422)):
            body = json.dumps({"name": "tiny", "documents": ["ab"] * documents, "train": False}).encode()
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from now
            before = rss_mb(pid)
            answer = client.post("/v1/corpora", content=body, headers={"content-type": "application/json"},
                                 timeout=120)
            assert answer.status_code == status, answer.text
            growth, size = peak_rss_mb(pid) - before, len(body) / 2**20
            assert growth < 8 * size, f"{documents} documents in {size:.1f} MiB raised the peak by {growth:.0f} MB"
        assert "PEER_MAX_CORPUS_DOCUMENTS" in answer.json()["detail"]
