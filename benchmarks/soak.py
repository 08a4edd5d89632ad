"""Soak: does the distributed service hold 64 concurrent clients for 10 minutes while it trains and swaps versions?

Starts the distributed form on this machine: a private redis-server on a free port, a private PostgreSQL
database (created through PEER_TEST_PG_ADMIN, default ``postgresql://postgres@127.0.0.1:5432/test``, dropped at
the end), ``peer-service migrate``, then ``peer-service api`` and one ``peer-service worker`` (one torch thread
each: 2 cores here), a small model (d 64, 2 blocks, 32² experts) without bootstrap training. Then for
``--minutes``:

- ``--clients`` clients loop over a mix: POST /v1/generate (JSON 30%, SSE 15%), /v1/completions 15% (half
  streamed), /v1/chat/completions 15%, GETs 25% (/v1/status, /v1/versions, /v1/jobs, /v1/experts/utilization,
  /readyz, /healthz, /metrics);
- a trainer uploads a small generated corpus every ``--upload-every`` seconds (its ingest and a short training
  job, ``activate: always``, follow in the worker, so versions are published and swapped in under load);
- an operator rolls back to the previous version every ``--rollback-every`` seconds and forward again later.

It reports requests by status (any status but 2xx and 429, any transport error and any stream that ends with an
error event are errors: the soak passes with none), p50/p95/p99 latency overall and per kind (a stream's latency
is to its last event), completion tokens/s, the API process's resident memory at the start of the load, every
minute and at the end (from /proc), versions published and activations made, the API's own 500 counter, and
whether every job ended. Results as JSON with ``--json``.

    .venv/bin/python benchmarks/soak.py                                   # 64 clients, 10 minutes
    .venv/bin/python benchmarks/soak.py --minutes 1 --clients 16          # a quick check
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psycopg

from serve_load import free_port, percentile, service_process, training_text

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("PEER_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
PG_HOST = os.environ.get("PEER_TEST_PG_HOST", "postgres@127.0.0.1:5432")
MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128, "max_seq_len": 128, "peer_experts": 32 * 32,
         "peer_heads": 2, "peer_top_k": 8, "peer_d_key": 32}
SERVICE = {"base_model": "fresh", "bootstrap_corpus": "", "train_steps": 60, "train_batch_size": 8, "train_seq_len": 64, "new_experts": 64,
           "eval_max_batches": 2, "api_torch_threads": 1, "worker_torch_threads": 1, "log_format": "json",
           "usage_flush_seconds": 5, "swap_poll_seconds": 1, "job_heartbeat_seconds": 1}
MIX = (("generate", 30), ("generate_sse", 15), ("completions", 15), ("chat", 15), ("get", 25))
GETS = ("/v1/status", "/v1/versions", "/v1/jobs?limit=20", "/v1/experts/utilization", "/readyz", "/healthz",
        "/metrics")
PROMPTS = ("ROMEO:", "The river", "Once upon a time", "In the morning the", "She said that")


# ---- the service --------------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextmanager
def private_redis():
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def private_database():
    name = f"peer_soak_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_HOST}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def distributed_service(home: Path, port: int):
    """migrate, api and one worker on a private database and redis; yields the api process."""
    with ExitStack() as stack:
        database, broker = stack.enter_context(private_database()), stack.enter_context(private_redis())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEER_")}
        env.update({f"PEER_{k.upper()}": str(v) for k, v in {**MODEL, **SERVICE, "home": home,
                                                            "database_url": database, "broker_url": broker}.items()})
        subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        api = stack.enter_context(service_process(["api", "--port", str(port)], env, home / "api.log"))
        stack.enter_context(service_process(["worker"], env, home / "worker.log"))
        yield api


async def wait_ready(client: httpx.AsyncClient, api: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.poll() is not None:
            raise RuntimeError("the api exited during start-up")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("the api was not ready in time")


# ---- the load -----------------------------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter = Counter()  # what went wrong, by kind and reason
        self.tokens = 0

    def record(self, kind: str, status: int | str, seconds: float, error: str | None = None) -> None:
        self.statuses[status] += 1
        if error is not None:
            self.errors[f"{kind}: {error}"] += 1
        elif status != 429:
            self.latency[kind].append(seconds)


def read_stream(lines: list[str]) -> tuple[int, str | None]:
    """Completion tokens of a finished SSE stream (from its done event or usage chunk) and the error it
    carried (None when it ended cleanly with its terminal event)."""
    tokens, error, ended = 0, None, False
    for line in lines:
        if line.startswith("event: error") or line.startswith('data: {"error"'):
            error = "stream ended with an error event"
        elif line.startswith("event: done") or line == "data: [DONE]":
            ended = True
        elif line.startswith("data: {"):
            try:
                data = json.loads(line[6:])
            except json.JSONDecodeError:
                error = "an event that is not JSON"
                continue
            tokens += data.get("completion_tokens") or (data.get("usage") or {}).get("completion_tokens", 0)
    return tokens, error or (None if ended else "stream ended without its terminal event")


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random, tally: Tally) -> None:
    prompt, seed = rng.choice(PROMPTS), rng.randrange(1 << 30)
    start = time.perf_counter()
    stream = kind == "generate_sse" or (kind == "completions" and rng.random() < 0.5)
    if kind == "get":
        method, path, body = "GET", rng.choice(GETS), None
    elif kind.startswith("generate"):
        method, path, body = "POST", "/v1/generate", {"prompt": prompt, "max_tokens": 24, "seed": seed,
                                                      "stream": stream}
    elif kind == "completions":
        method, path, body = "POST", "/v1/completions", {"model": "peer", "prompt": prompt, "max_tokens": 24,
                                                         "seed": seed, "stream": stream,
                                                         "stream_options": {"include_usage": True}}
    else:
        method, path, body = "POST", "/v1/chat/completions", {
            "model": "peer", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "seed": seed}
    try:
        async with client.stream(method, path, json=body) as response:
            if stream and response.status_code == 200:
                tokens, error = read_stream([line async for line in response.aiter_lines() if line])
                tally.tokens += tokens
            else:
                payload = await response.aread()
                error = None
                if response.status_code == 200 and kind != "get":
                    data = json.loads(payload)
                    tally.tokens += data.get("completion_tokens") or data.get("usage", {}).get("completion_tokens", 0)
        status = response.status_code
        if status >= 300 and status != 429:
            error = f"{status} on {path}"
    except httpx.HTTPError as exc:
        status, error = "transport error", f"{type(exc).__name__} on {path}"
    tally.record(kind, status, time.perf_counter() - start, error)


async def client_loop(client: httpx.AsyncClient, index: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(index)
    kinds, weights = zip(*MIX)
    while time.monotonic() < deadline:
        await one(client, rng.choices(kinds, weights)[0], rng, tally)


async def trainer(client: httpx.AsyncClient, deadline: float, every: float, events: dict) -> None:
    """A small corpus every ``every`` seconds; its ingest and training (activate: always) follow in the worker."""
    index = 0
    while time.monotonic() + every < deadline:
        text = training_text(40_000, seed=1000 + index)
        response = await client.post("/v1/corpora", json={"name": f"soak-{index}", "text": text,
                                                          "train_options": {"activate": "always", "seed": index}})
        events["uploads"][response.status_code] += 1
        index += 1
        await asyncio.sleep(every)


async def operator(client: httpx.AsyncClient, deadline: float, every: float, events: dict) -> None:
    """Roll back to the previous version, and forward to the newest at the next turn."""
    back = True
    while time.monotonic() + every < deadline:
        await asyncio.sleep(every)
        versions = [v["id"] for v in (await client.get("/v1/versions")).json()]
        if len(versions) < 2:
            continue
        target = versions[1] if back else versions[0]
        response = await client.post(f"/v1/versions/{target}/activate", json={"reason": "soak: rollback" if back
                                                                              else "soak: forward"})
        events["activations"][response.status_code] += 1
        back = not back


async def memory_sampler(pid: int, deadline: float, samples: list) -> None:
    start = time.monotonic()
    while time.monotonic() < deadline:
        samples.append((round(time.monotonic() - start), rss_bytes(pid)))
        await asyncio.sleep(min(60.0, max(1.0, deadline - time.monotonic())))


def server_errors(metrics_text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
               if line.startswith("peer_http_server_errors_total{"))


async def soak(args, base_url: str, api: subprocess.Popen) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        await wait_ready(client, api)
        for _ in range(3):  # warm-up
            await client.post("/v1/generate", json={"prompt": "warm", "max_tokens": 8})
        tally, events, memory = Tally(), {"uploads": Counter(), "activations": Counter()}, []
        started = time.monotonic()
        deadline = started + args.minutes * 60
        await asyncio.gather(memory_sampler(api.pid, deadline, memory),
                             trainer(client, deadline, args.upload_every, events),
                             operator(client, deadline, args.rollback_every, events),
                             *(client_loop(client, i, deadline, tally) for i in range(args.clients)))
        elapsed = time.monotonic() - started
        end_rss = rss_bytes(api.pid)
        await asyncio.sleep(args.settle)  # the last jobs finish
        versions = (await client.get("/v1/versions")).json()
        jobs = (await client.get("/v1/jobs", params={"limit": 1000})).json()
        activations = [len((await client.get(f"/v1/versions/{v['id']}")).json()["activations"]) for v in versions]
        metrics_text = (await client.get("/metrics")).text
    everything = [s for values in tally.latency.values() for s in values]
    return {
        "clients": args.clients, "minutes": args.minutes, "seconds": round(elapsed, 1),
        "requests": sum(tally.statuses.values()), "by_status": {str(k): v for k, v in sorted(tally.statuses.items(),
                                                                                            key=str)},
        "errors": sum(tally.errors.values()), "error_kinds": dict(tally.errors),
        "latency_ms": {kind: {f"p{q}": round(percentile(values, q) * 1000, 1) for q in (50, 95, 99)} | {
            "n": len(values)} for kind, values in sorted({"all": everything, **tally.latency}.items())},
        "completion_tokens_per_s": round(tally.tokens / elapsed, 1),
        "api_rss_mb": {"start": round(memory[0][1] / 2**20, 1), "end": round(end_rss / 2**20, 1),
                       "samples": [(t, round(b / 2**20, 1)) for t, b in memory]},
        "uploads": dict(events["uploads"]), "operator_activations": dict(events["activations"]),
        "versions": len(versions), "activations_total": sum(activations),
        "jobs_by_state": dict(Counter(j["state"] for j in jobs)),
        "api_server_errors_counted": server_errors(metrics_text),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--upload-every", type=float, default=45.0, help="seconds between corpus uploads")
    parser.add_argument("--rollback-every", type=float, default=40.0, help="seconds between operator activations")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds for the last jobs after the load")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary PEER_HOME (logs) and print it")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        parser.exit(2, "soak: needs redis-server on PATH for its private broker\n")
    home = Path(tempfile.mkdtemp(prefix="peer-soak-"))
    port = free_port()
    try:
        with distributed_service(home, port) as api:
            results = asyncio.run(soak(args, f"http://127.0.0.1:{port}", api))
    finally:
        if args.keep:
            print(f"logs in {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)
    results["passed"] = results["errors"] == 0 and results["api_server_errors_counted"] == 0
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
