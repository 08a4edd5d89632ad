"""Faults injected into the real processes (``peer-service api``, ``worker``, ``serve``) on PostgreSQL and a
private Redis: the broker down and restarted empty, database connections cut mid-job (a TCP proxy), a
worker's warm shutdown, the API killed mid-upload and mid-activation, ``serve`` stopped mid-training. After
each: no half version, no lost or duplicated job, no stuck corpus, and the service back without an operator."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import domain_text, free_port, wait_for
from .test_processes import Process, finished, http, job, pg_database, processes, service_env, start, wait_ready  # noqa: F401

SLOW_JOB = {"steps": 150}


class RedisServer:
    """A private redis-server on its own port, without persistence: a restart comes back empty."""

    def __init__(self, log: Path):
        self.port, self.log, self.popen = free_port(), log, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.popen = subprocess.Popen(["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"],
                                      stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        wait_for(self._answers, 10, what="redis-server")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture()
def redis_server(tmp_path):
    if subprocess.run(["which", "redis-server"], capture_output=True).returncode:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis.log")
    yield server
    server.stop()


class TcpProxy:
    """A TCP proxy to PostgreSQL whose connections can be cut: ``cut(seconds)`` closes every open connection
    and refuses new ones for that long, as a network partition or a database restart does."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.down_until = 0.0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                client.close()
                continue
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds
        with self.lock:
            sockets, self.sockets = self.sockets, set()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut(0)


def migrate(env) -> None:
    result = subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def upload(client: httpx.Client, train_options: dict | None = None, name: str = "english") -> dict:
    accepted = client.post("/v1/corpora", json={"name": name, "text": domain_text("english"),
                                                "train_options": train_options or {}})
    assert accepted.status_code == 202, accepted.text
    return accepted.json()


def training(client: httpx.Client, ingest_id: int) -> int:
    ingest = finished(client, ingest_id)
    assert ingest["state"] == "succeeded", ingest
    return ingest["next_job_id"]


def stepping(client: httpx.Client, job_id: int) -> dict:
    return wait_for(lambda: (lambda j: j if j["state"] == "running" and j["metrics"].get("step") else None)(
        job(client, job_id)), 120, interval=0.2, what=f"job {job_id} to train")


def versions_of(client: httpx.Client, job_id: int) -> int:
    return [v["job_id"] for v in client.get("/v1/versions").json()].count(job_id)


def test_the_broker_down_at_upload_and_restarted_empty_mid_job(pg_database, redis_server, processes, tmp_path):
    env = service_env(tmp_path, database_url=pg_database, broker_url=redis_server.url, job_watchdog_seconds=1)
    migrate(env)
    port = free_port()
    api = start(processes, ["api", "--port", str(port)], env, tmp_path / "api.log")
    with http(port) as client:
        wait_ready(client, api)
        accepted = upload(client, SLOW_JOB)  # Redis is not running: the corpus is stored, its job not sent
        ingest_id = accepted["job"]["id"]
        assert job(client, ingest_id)["state"] == "queued"

        redis_server.start()
        start(processes, ["worker"], env, tmp_path / "worker.log")  # its watchdog sends what was never sent
        train_id = training(client, ingest_id)
        stepping(client, train_id)
        redis_server.stop()  # mid-job; it comes back empty
        time.sleep(2)
        redis_server.start()
        trained = finished(client, train_id, timeout=180)
        assert trained["state"] == "succeeded" and versions_of(client, train_id) == 1, trained

        second = upload(client, {"steps": 12}, name="after")  # the broker works again for new jobs
        assert finished(client, training(client, second["job"]["id"]))["state"] == "succeeded"
        corpora = client.get("/v1/corpora").json()
        assert [c["state"] for c in corpora] == ["ready", "ready"]


def test_database_connections_cut_mid_job(pg_database, redis_url, processes, tmp_path):
    from sqlalchemy.engine import make_url

    url = make_url(pg_database)
    proxy = TcpProxy((url.host, url.port or 5432))
    try:
        env = service_env(tmp_path, database_url=pg_database, broker_url=redis_url)
        migrate(env)
        worker_env = {**env, "PEER_DATABASE_URL": url.set(port=proxy.port).render_as_string(hide_password=False)}
        port = free_port()
        api = start(processes, ["api", "--port", str(port)], env, tmp_path / "api.log")
        start(processes, ["worker"], worker_env, tmp_path / "worker.log")
        with http(port) as client:
            wait_ready(client, api)
            train_id = training(client, upload(client, SLOW_JOB)["job"]["id"])
            stepping(client, train_id)
            proxy.cut(5)  # the worker's database connections drop and none can be made for 5 s
            trained = finished(client, train_id, timeout=180)
            assert trained["state"] == "succeeded" and trained["attempts"] == 1, trained
            assert versions_of(client, train_id) == 1
    finally:
        proxy.close()


def test_a_worker_stopped_mid_job_hands_it_back_at_once(pg_database, redis_url, processes, tmp_path):
    env = service_env(tmp_path, database_url=pg_database, broker_url=redis_url, job_stale_seconds=600)
    migrate(env)
    port = free_port()
    api = start(processes, ["api", "--port", str(port)], env, tmp_path / "api.log")
    worker = start(processes, ["worker"], env, tmp_path / "worker1.log")
    with http(port) as client:
        wait_ready(client, api)
        train_id = training(client, upload(client, SLOW_JOB)["job"]["id"])
        stepping(client, train_id)
        worker.stop(signal.SIGTERM)  # a warm shutdown (a deploy, Ctrl-C)
        handed_back = job(client, train_id)
        assert handed_back["state"] == "queued" and handed_back["attempts"] == 0, handed_back
        start(processes, ["worker"], env, tmp_path / "worker2.log")  # no 600 s stale timeout to wait for
        trained = finished(client, train_id, timeout=180)
        assert trained["state"] == "succeeded" and trained["attempts"] == 1 and versions_of(client, train_id) == 1


def slow_body(chunks: int, pause: float):
    for _ in range(chunks):
        yield b"some text that arrives slowly\n" * 100
        time.sleep(pause)


def test_the_api_killed_mid_upload_and_mid_activation(pg_database, redis_url, processes, tmp_path):
    env = service_env(tmp_path, database_url=pg_database, broker_url=redis_url)
    migrate(env)
    port = free_port()
    api = start(processes, ["api", "--port", str(port)], env, tmp_path / "api1.log")
    with http(port) as client:
        wait_ready(client, api)
        sender = threading.Thread(target=lambda: pytest.raises(httpx.TransportError, httpx.post,
                                                                f"http://127.0.0.1:{port}/v1/corpora?name=cut",
                                                                content=slow_body(50, 0.1),
                                                                headers={"content-type": "text/plain"}, timeout=30))
        sender.start()
        time.sleep(1.0)
        api.stop(signal.SIGKILL)  # mid-body
        sender.join(30)
        api = start(processes, ["api", "--port", str(port)], env, tmp_path / "api2.log")
        wait_ready(client, api)
        assert client.get("/v1/corpora").json() == []  # nothing of the cut upload was recorded
        start(processes, ["worker"], env, tmp_path / "worker.log")
        trained = finished(client, training(client, upload(client, {"steps": 12})["job"]["id"]))
        new = trained["result_version_id"]

        try:  # a rollback to version 1, not waited for
            httpx.post(f"http://127.0.0.1:{port}/v1/versions/1/activate", timeout=0.05)
        except httpx.TransportError:
            pass
        api.stop(signal.SIGKILL)  # while the activation loads, commits or swaps
        api = start(processes, ["api", "--port", str(port)], env, tmp_path / "api3.log")
        wait_ready(client, api)
        status = client.get("/v1/status").json()
        assert status["active_version"] in (1, new) and status["served_version"] == status["active_version"]
        assert status["fallback"] is None


def test_serve_stopped_mid_training_resumes_the_job_when_started_again(processes, tmp_path):
    """Ctrl-C on ``scripts/serve.sh`` during a training job, then start again: the job used to sit ``running``
    with no worker for PEER_JOB_STALE_SECONDS (600 s)."""
    home, port = tmp_path / "home", free_port()
    env = service_env(home, job_stale_seconds=600)

    def serve(log: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve", "--port",
                                 str(port)], env=env, stdout=open(tmp_path / log, "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    first = serve("serve1.log")
    try:
        with http(port) as client:
            wait_for(lambda: _ready(client), 120, interval=0.3, what="serve to be ready")
            train_id = training(client, upload(client, {"steps": 3000})["job"]["id"])
            stepping(client, train_id)
            os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches serve and its workers
            first.wait(60)
            state = sqlite3.connect(home / "peer.db").execute("SELECT state FROM jobs WHERE id = ?",
                                                             (train_id,)).fetchone()[0]
            assert state == "queued"
            second = serve("serve2.log")
            try:
                wait_for(lambda: _ready(client), 120, interval=0.3, what="serve to be ready again")
                resumed = stepping(client, train_id)  # within seconds, not after the stale timeout
                assert resumed["attempts"] == 1, resumed
                assert client.post(f"/v1/jobs/{train_id}/cancel").status_code == 200
                assert finished(client, train_id)["state"] == "cancelled"
            finally:
                os.killpg(second.pid, signal.SIGTERM)
                second.wait(60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        print((tmp_path / "serve1.log").read_text(errors="replace")[-4000:])


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False
