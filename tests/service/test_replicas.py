"""Two API replicas and two workers on one PostgreSQL, broker and store, as real processes: the workers train
side by side under the lineage rules, an activation reaches both replicas at once (PostgreSQL NOTIFY, long
before the poll interval), no request fails or mixes versions while it does, and usage adds up across them."""
from __future__ import annotations

import json
import threading
import time

import httpx

from .conftest import domain_text, free_port, wait_for
from .test_processes import finished, http, job, pg_database, processes, service_env, start, wait_ready  # noqa: F401

POLL_SECONDS = 30.0  # far above what the test allows an activation to take: only NOTIFY can meet it
PROMPT = {"prompt": "the cat", "max_tokens": 8, "temperature": 0.0}


def tokens_served(client: httpx.Client, version: int) -> int:
    return client.get("/v1/experts/utilization", params={"version": version}).json()["layers"]["1"]["tokens"]


def settled_usage(client: httpx.Client, version: int) -> int:
    """``tokens_served`` once it holds still for a second (five usage flushes): a flush can land while a
    request is half decoded, so the first change seen may be part of one request's tokens."""
    while True:
        before = tokens_served(client, version)
        time.sleep(1.0)
        if tokens_served(client, version) == before:
            return before


def stream_versions(url: str) -> set[int]:
    """The versions named by one SSE generation's token and done events."""
    versions = set()
    with httpx.stream("POST", f"{url}/v1/generate", json={**PROMPT, "max_tokens": 16, "stream": True},
                      timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                versions.add(json.loads(line[6:])["version"])
    return versions


def test_replicas_and_workers_share_one_service(pg_database, redis_url, processes, tmp_path):
    env = service_env(tmp_path, database_url=pg_database, broker_url=redis_url, swap_poll_seconds=POLL_SECONDS)
    from .test_faults import migrate

    migrate(env)
    ports = [free_port(), free_port()]
    apis = [start(processes, ["api", "--port", str(port)], env, tmp_path / f"api{i}.log") for i, port in enumerate(ports)]
    for i in range(2):
        start(processes, ["worker"], env, tmp_path / f"worker{i}.log")
    clients = [http(port) for port in ports]
    for client, api in zip(clients, apis):
        wait_ready(client, api)

    # corpora arrive through either replica; two training jobs run side by side, one on each worker
    corpora = []
    for client, domain in zip(clients, ("english", "code")):
        accepted = client.post("/v1/corpora", json={"name": domain, "text": domain_text(domain), "train": False})
        assert accepted.status_code == 202, accepted.text
        corpora.append(accepted.json()["corpus"]["id"])
        assert finished(client, accepted.json()["job"]["id"])["state"] == "succeeded"
    jobs = [client.post("/v1/jobs", json={"corpus_ids": [corpus], "options": {"steps": 60}}).json()["id"]
            for client, corpus in zip(clients, corpora)]
    wait_for(lambda: all(job(clients[0], j)["state"] == "running" for j in jobs), 60, interval=0.2,
             what="both jobs running at once")
    done = [finished(clients[0], j, timeout=240) for j in jobs]
    assert [d["state"] for d in done] == ["succeeded", "succeeded"], done
    assert [d["base_version_id"] for d in done] == [1, 1]  # both started from the version active then
    activated = [d for d in done if d["metrics"]["activated"]]
    assert len(activated) == 1  # the second to publish found the active version moved: published, not activated
    other = next(d for d in done if not d["metrics"]["activated"])
    assert "active version moved" in other["metrics"]["gate"]
    first, second = activated[0]["result_version_id"], other["result_version_id"]
    for client in clients:
        wait_for(lambda c=client: c.get("/v1/status").json()["served_version"] == first, 10, what="the new version")

    # usage counted on either replica adds up in the database
    base = tokens_served(clients[0], first)
    assert clients[0].post("/v1/generate", json=PROMPT).status_code == 200
    per_request = wait_for(lambda: settled_usage(clients[0], first) - base, 10, what="one request's usage")
    for client in clients * 3:
        assert client.post("/v1/generate", json=PROMPT).status_code == 200
    wait_for(lambda: tokens_served(clients[0], first) - base == 7 * per_request, 10, what="usage of both replicas")

    # an activation on one replica reaches both while they serve: no request fails, none mixes versions
    failures, mixed, stop = [], [], threading.Event()

    def hammer(url: str) -> None:
        while not stop.is_set():
            try:
                versions = stream_versions(url)
                if len(versions) != 1:
                    mixed.append(versions)
                answer = httpx.post(f"{url}/v1/generate", json=PROMPT, timeout=30)
                if answer.status_code != 200:
                    failures.append(answer.text)
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(f"http://127.0.0.1:{port}",)) for port in ports for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        started = time.monotonic()
        assert clients[0].post(f"/v1/versions/{second}/activate").status_code == 200
        wait_for(lambda: clients[1].get("/v1/status").json()["served_version"] == second, 5,
                 what="the other replica to serve the activated version")
        assert time.monotonic() - started < POLL_SECONDS / 3
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == [] and mixed == []
    for client in clients:
        client.close()
