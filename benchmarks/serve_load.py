"""How fast does the embedded service generate under load, idle and while a training job runs?

Starts the real service (``python -m service.cli serve``) on loopback in its embedded default (SQLite,
Celery's filesystem broker, no other service) under a temporary PEER_HOME, without bootstrap training
(PEER_BASE_MODEL=fresh, PEER_BOOTSTRAP_CORPUS=""), so it serves a fresh, untrained version 1 of the configured shape. Then, for
each concurrency level C, C clients loop POST /v1/generate for a fixed duration (after 2 warm-up
requests). Client 0 (at 1 client the only one) streams (``"stream": true``, server-sent events) to
measure the time to the first token; the others ask for JSON. Per level it reports requests, errors
(429s apart), wall latency p50/p99 of the successful requests (streamed ones included: their latency is
the time to the ``done`` event), completion tokens/s (all completion tokens / wall time of the level),
requests/s and the TTFT p50 of client 0.

The same levels run a second time while a training job runs in the service's train worker: a generated
~300 KB English-like corpus is uploaded with ``train: true`` and enough steps to outlast the phase; the
levels start once the job is ``running`` and the job is cancelled after them. The ratios during training /
idle show how much training slows generation down on this machine.

    .venv/bin/python benchmarks/serve_load.py                                   # service shape, 20 s a level
    .venv/bin/python benchmarks/serve_load.py --tiny --duration 5 --clients 1,4  # quick check
    .venv/bin/python benchmarks/serve_load.py --json runs/serve_load.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0
JOB_RUNNING_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 600.0
WARMUP_REQUESTS = 2
PROMPT = "ROMEO:"
TINY = {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128, "peer_experts": 1024, "peer_heads": 2,
        "peer_d_key": 32}
SHAPE_OPTIONS = tuple(TINY)  # --d-model ... --peer-d-key, each PEER_<NAME> for the service
# an inherited PEER_* setting that would take the service off its embedded default or lock its API
NOT_INHERITED = ("PEER_DATABASE_URL", "PEER_BROKER_URL", "PEER_STORE_DIR", "PEER_CORPORA_CACHE_DIR",
                 "PEER_API_KEYS", "PEER_HOME", "PEER_HOST", "PEER_PORT", "PEER_BOOTSTRAP_CORPUS")


class ServiceError(RuntimeError):
    """The service did not start, answered something unexpected, or a job did not behave."""


# ---- the service process ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(home: Path, shape: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(PEER_HOME=str(home), PEER_BASE_MODEL="fresh", PEER_BOOTSTRAP_CORPUS="")
    env.update({f"PEER_{name.upper()}": str(value) for name, value in shape.items()})
    return env


def log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no service log)"
    return "\n".join(text[-lines:])


@contextmanager
def running_service(home: Path, port: int, shape: dict[str, int], log_path: Path):
    """``peer-service serve`` as a subprocess; see :func:`service_process`."""
    with service_process(["serve", "--port", str(port)], service_env(home, shape), log_path) as proc:
        yield proc


@contextmanager
def service_process(args: list[str], env: dict[str, str], log_path: Path):
    """``peer-service *args`` as a subprocess in its own process group (so that workers it starts can be killed
    with it); stdout and stderr go to ``log_path``. Stopped with SIGTERM, its group killed after STOP_TIMEOUT_S."""
    argv = [sys.executable, "-m", "service.cli", "--log-level", "WARNING", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"{args[0]} did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM: killing it", file=sys.stderr)
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started: the process and its workers
                proc.wait()
        stop_leftovers(proc.pid)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_leftovers(pgid: int) -> None:
    """Stop what is left of the service's process group once ``serve`` has exited. With uvicorn >= 0.29
    ``serve`` dies of the SIGTERM it re-raises after its graceful shutdown, before it stops its workers."""
    if not group_alive(pgid):
        return
    print("the service's workers outlived it: stopping them (SIGTERM to its process group)", file=sys.stderr)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive(pgid):
        print(f"workers still running {STOP_TIMEOUT_S:.0f} s after SIGTERM: killing them", file=sys.stderr)
        os.killpg(pgid, signal.SIGKILL)


async def wait_ready(client: httpx.AsyncClient, proc: subprocess.Popen) -> float:
    """Seconds until GET /readyz answers 200."""
    started = time.perf_counter()
    last = "no answer"
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if proc.poll() is not None:
            raise ServiceError(f"service exited with status {proc.returncode} before it was ready")
        try:
            response = await client.get("/readyz", timeout=15)
            if response.status_code == 200:
                return time.perf_counter() - started
            last = f"{response.status_code} {response.text}"
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.5)
    raise ServiceError(f"GET /readyz not 200 within {READY_TIMEOUT_S:.0f} s; last answer: {last}")


# ---- load --------------------------------------------------------------------------------------------

@dataclass
class Sample:
    latency_s: float
    completion_tokens: int
    ttft_s: float | None = None  # streamed requests only


@dataclass
class LevelTally:
    samples: list[Sample] = field(default_factory=list)
    stream_samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    throttled: int = 0  # 429s
    error_examples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(what)


def generate_body(seed: int, max_tokens: int, stream: bool) -> dict:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed}
    if stream:
        body["stream"] = True
    return body


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[int, Sample | None, str]:
    """(status, sample or None, error text); 200 with an SSE ``error`` event counts as an error."""
    started = time.perf_counter()
    if not body.get("stream"):
        response = await client.post("/v1/generate", json=body)
        if response.status_code != 200:
            return response.status_code, None, response.text[:300]
        return 200, Sample(time.perf_counter() - started, response.json()["completion_tokens"]), ""
    ttft, event = None, None
    async with client.stream("POST", "/v1/generate", json=body) as response:
        if response.status_code != 200:
            return response.status_code, None, (await response.aread()).decode(errors="replace")[:300]
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
                if event == "token" and ttft is None:
                    ttft = time.perf_counter() - started
            elif line.startswith("data:") and event in ("done", "error"):
                data = json.loads(line.removeprefix("data:"))
                if event == "error":
                    return 200, None, f"SSE error event: {data.get('message')}"
                return 200, Sample(time.perf_counter() - started, data["completion_tokens"], ttft), ""
    return 200, None, "SSE stream ended without a done event"


async def client_loop(client: httpx.AsyncClient, index: int, deadline: float, max_tokens: int,
                      tally: LevelTally) -> None:
    stream = index == 0
    seed = index
    while time.perf_counter() < deadline:
        try:
            status, sample, error = await one_request(client, generate_body(seed, max_tokens, stream))
        except httpx.HTTPError as exc:
            tally.error(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.1)
            continue
        seed += 1_000  # a different sample each time, never the same seed as another client
        if status == 429:
            tally.throttled += 1
            await asyncio.sleep(0.05)
        elif sample is None:
            tally.error(f"{status}: {error}")
        else:
            (tally.stream_samples if stream else tally.samples).append(sample)


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


async def run_level(base_url: str, clients: int, duration: float, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        for i in range(WARMUP_REQUESTS):
            status, _, error = await one_request(client, generate_body(10**9 + i, max_tokens, False))
            if status != 200:
                raise ServiceError(f"warm-up POST /v1/generate answered {status}: {error}")
        tally = LevelTally()
        started = time.perf_counter()
        deadline = started + duration
        await asyncio.gather(*(client_loop(client, i, deadline, max_tokens, tally) for i in range(clients)))
        wall = time.perf_counter() - started
    samples = tally.samples + tally.stream_samples
    latencies = [s.latency_s for s in samples]
    tokens = sum(s.completion_tokens for s in samples)
    ttfts = [s.ttft_s for s in tally.stream_samples if s.ttft_s is not None]
    return {"clients": clients, "wall_s": round(wall, 2), "requests": len(samples), "errors": tally.errors,
            "throttled_429": tally.throttled, "completion_tokens": tokens,
            "latency_p50_ms": ms(percentile(latencies, 50)), "latency_p99_ms": ms(percentile(latencies, 99)),
            "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(samples) / wall, 2),
            "ttft_p50_ms": ms(percentile(ttfts, 50)), "streamed_requests": len(tally.stream_samples),
            "error_examples": tally.error_examples}


async def run_levels(base_url: str, levels: list[int], duration: float, max_tokens: int, label: str) -> list[dict]:
    results = []
    for clients in levels:
        result = await run_level(base_url, clients, duration, max_tokens)
        print(f"  [{label}] {clients} clients: {result['requests']} requests, {result['tokens_per_s']} tokens/s, "
              f"p50 {result['latency_p50_ms']} ms, {result['errors']} errors, {result['throttled_429']} 429s",
              flush=True)
        results.append(result)
    return results


# ---- training in the background ----------------------------------------------------------------------

SUBJECTS = ["the old king", "a young soldier", "my gentle friend", "the weary traveller", "her brother", "the duke",
            "a quiet servant", "the merchant of the town", "our captain", "the fair lady", "this honest man",
            "the little boy", "a stranger from the north", "the good doctor", "his faithful dog"]
VERBS = ["walked towards", "spoke softly to", "looked upon", "remembered", "waited for", "followed", "praised",
         "forgot", "argued with", "carried a letter to", "dreamed of", "called out to", "feared", "loved",
         "sent a gift to"]
OBJECTS = ["the river", "the castle gate", "the burning city", "an empty chair", "the morning sky", "the garden",
           "the silent hall", "a distant ship", "the market square", "the old church", "the winter road",
           "a broken sword", "the candle light", "the open sea", "the narrow bridge"]
TAILS = ["before the sun went down", "and said nothing more", "while the bells were ringing", "as the rain began",
         "with a heavy heart", "for the last time", "without a word", "in the middle of the night",
         "because it was too late", "and then turned away", "as if nothing had happened", "under a pale moon"]
OPENERS = ["", "", "", "Then ", "At last ", "In the morning ", "Later that day ", "Once again ", "Suddenly "]


def sentence(rng: random.Random) -> str:
    text = f"{rng.choice(OPENERS)}{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
    text = text[0].upper() + text[1:]
    return text + rng.choice([".", ".", ".", "!", "?"])


def training_text(target_bytes: int = 300_000, seed: int = 0) -> str:
    """Deterministic English-like paragraphs (all different: ingestion drops duplicate paragraphs)."""
    rng = random.Random(seed)
    paragraphs, size, seen = [], 0, set()
    while size < target_bytes:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(3, 6)))
        if paragraph in seen:
            continue
        seen.add(paragraph)
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs) + "\n"


async def start_training(client: httpx.AsyncClient, steps: int) -> int:
    """Upload the corpus with a training job; the id of that job once it is running."""
    text = training_text()
    body = {"name": "load-train", "text": text, "train": True, "train_options": {"steps": steps}}
    response = await client.post("/v1/corpora", json=body, timeout=120)
    if response.status_code != 202:
        raise ServiceError(f"POST /v1/corpora ({len(text):,} bytes) answered {response.status_code}: "
                           f"{response.text[:500]}")
    corpus_id = response.json()["corpus"]["id"]
    print(f"uploaded {len(text):,} bytes as corpus {corpus_id}; waiting for its training job to run", flush=True)
    started = time.perf_counter()
    last = []
    while time.perf_counter() - started < JOB_RUNNING_TIMEOUT_S:
        response = await client.get("/v1/jobs", params={"kind": "train"})
        response.raise_for_status()
        last = [job for job in response.json() if corpus_id in job["corpus_ids"]]
        for job in last:
            if job["state"] == "running":
                print(f"train job {job['id']} running after {time.perf_counter() - started:.1f} s", flush=True)
                return job["id"]
            if job["state"] in ("failed", "succeeded", "cancelled"):
                raise ServiceError(f"train job {job['id']} is {job['state']} before the load phase: {job}")
        await asyncio.sleep(0.5)
    ingest = (await client.get(f"/v1/corpora/{corpus_id}")).json()
    raise ServiceError(f"no running train job for corpus {corpus_id} within {JOB_RUNNING_TIMEOUT_S:.0f} s; "
                       f"train jobs: {last}; corpus: {ingest}")


async def stop_training(client: httpx.AsyncClient, job_id: int) -> dict:
    """Read the job (its speed as training saw it) and cancel it; wait a while until it is cancelled."""
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    summary = {"id": job_id, "state_at_end_of_phase": job["state"], "progress": job["progress"],
               "tokens_per_s": job["tokens_per_s"], "eta_s": job["eta_s"]}
    if job["state"] != "running":
        print(f"warning: train job {job_id} was {job['state']} at the end of the phase (raise --train-steps); "
              f"error: {job['error']}", file=sys.stderr)
    response = await client.post(f"/v1/jobs/{job_id}/cancel")
    summary["cancel_status"] = response.status_code
    started = time.perf_counter()
    while response.status_code == 200 and time.perf_counter() - started < STOP_TIMEOUT_S:
        state = (await client.get(f"/v1/jobs/{job_id}")).json()["state"]
        if state not in ("running", "cancelling"):
            break
        await asyncio.sleep(0.5)
    summary["state_after_cancel"] = (await client.get(f"/v1/jobs/{job_id}")).json()["state"]
    summary["cancel_wait_s"] = round(time.perf_counter() - started, 1)
    return summary


# ---- the run -----------------------------------------------------------------------------------------

async def benchmark(args, base_url: str, proc: subprocess.Popen) -> dict:
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as control:
        ready_s = await wait_ready(control, proc)
        print(f"service ready after {ready_s:.1f} s", flush=True)
        idle = await run_levels(base_url, levels, args.duration, args.max_tokens, "idle")
        job_id = await start_training(control, args.train_steps)
        during = await run_levels(base_url, levels, args.duration, args.max_tokens, "training")
        job = await stop_training(control, job_id)
    return {"ready_s": round(ready_s, 1), "idle": idle, "training": {"job": job, "levels": during},
            "ratios": ratios(idle, during)}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(idle: list[dict], during: list[dict]) -> list[dict]:
    return [{"clients": i["clients"], "tokens_per_s": ratio(d["tokens_per_s"], i["tokens_per_s"]),
             "latency_p50": ratio(d["latency_p50_ms"], i["latency_p50_ms"])} for i, d in zip(idle, during)]


def fmt(value, spec: str = ",.1f") -> str:
    return "" if value is None else format(value, spec)


def print_report(results: dict) -> None:
    print(f"\nmachine: {results['machine']['cpu_count']} CPUs, processor {results['machine']['processor']!r}, "
          f"{results['machine']['platform']}")
    print(f"torch threads: API {results['settings']['api_torch_threads']} (PEER_API_TORCH_THREADS), "
          f"worker {results['settings']['worker_torch_threads']} (PEER_WORKER_TORCH_THREADS, 0 = all cores)")
    print(f"model shape: {results['settings']['shape'] or 'service defaults'}; max_tokens "
          f"{results['settings']['max_tokens']}, {results['settings']['duration_s']} s a level")
    print(f"command: {results['command']}")
    print(f"service exit status: {results['service_exit_status']} (negative: killed by that signal)\n")
    print("| phase | clients | requests | errors | 429s | p50 ms | p99 ms | tokens/s | requests/s | TTFT p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for phase, rows in (("idle", results["idle"]), ("training", results["training"]["levels"])):
        for r in rows:
            print(f"| {phase} | {r['clients']} | {r['requests']} | {r['errors']} | {r['throttled_429']} | "
                  f"{fmt(r['latency_p50_ms'])} | {fmt(r['latency_p99_ms'])} | {fmt(r['tokens_per_s'])} | "
                  f"{fmt(r['requests_per_s'], '.2f')} | {fmt(r['ttft_p50_ms'])} |")
    job = results["training"]["job"]
    print(f"\ntrain job {job['id']}: {fmt(job['tokens_per_s'], ',.0f')} training tokens/s at the end of the phase "
          f"(state {job['state_at_end_of_phase']}, progress {job['progress']:.1%}); after cancel: "
          f"{job['state_after_cancel']}")
    print("\n| clients | tokens/s during / idle | p50 latency during / idle |\n|---:|---:|---:|")
    for r in results["ratios"]:
        print(f"| {r['clients']} | {fmt(r['tokens_per_s'], '.3f')} | {fmt(r['latency_p50'], '.3f')} |")
    for phase, rows in (("idle", results["idle"]), ("training", results["training"]["levels"])):
        for r in rows:
            for example in r["error_examples"]:
                print(f"error ({phase}, {r['clients']} clients): {example}")


def model_shape(args) -> dict[str, int]:
    shape = dict(TINY) if args.tiny else {}
    shape.update({name: getattr(args, name) for name in SHAPE_OPTIONS if getattr(args, name) is not None})
    return shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=2000, help="steps of the background training job")
    parser.add_argument("--port", type=int, help="default: a free port")
    parser.add_argument("--tiny", action="store_true", help="a tiny model for quick checks: " +
                        " ".join(f"PEER_{k.upper()}={v}" for k, v in TINY.items()))
    for name in SHAPE_OPTIONS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"PEER_{name.upper()} (default: service's)")
    parser.add_argument("--json", help="also write all results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary PEER_HOME (and the service log)")
    args = parser.parse_args()

    shape = model_shape(args)
    port = args.port or free_port()
    home = Path(tempfile.mkdtemp(prefix="peer-serve-load-"))
    log_path = home / "service.log"
    results = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(), "platform": platform.platform()},
        "settings": {"shape": shape, "max_tokens": args.max_tokens, "duration_s": args.duration,
                     "train_steps": args.train_steps, "clients": args.clients,
                     "api_torch_threads": int(os.environ.get("PEER_API_TORCH_THREADS", "1")),
                     "worker_torch_threads": int(os.environ.get("PEER_WORKER_TORCH_THREADS", "0"))},
    }
    print(f"PEER_HOME {home}, service on 127.0.0.1:{port}, log {log_path}", flush=True)
    failed = True
    try:
        with running_service(home, port, shape, log_path) as proc:
            results.update(asyncio.run(benchmark(args, f"http://127.0.0.1:{port}", proc)))
        results["service_exit_status"] = proc.returncode
        failed = False
    except (ServiceError, httpx.HTTPError) as exc:
        print(f"\nFAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if failed:
            print(f"--- last lines of the service log ({log_path}) ---\n{log_tail(log_path)}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    if failed:
        sys.exit(1)
    print_report(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
