"""How fast a checkpoint moves to and from the store: a local directory against an S3 object store.

The S3 store is moto's server (``moto[server]``, the tests' test extra) run as a separate process on
loopback, so the figures measure our side (one PUT or GET per chunk, hashing, copying into the tensor) and
the request overhead, not a network: a real S3 adds its latency per request, which is what
PEER_STORE_CONCURRENCY (chunks in flight) hides. For each concurrency: a first save (every chunk new), a
second save of the same weights (every chunk reused: one server-side copy each to renew it, no bytes sent),
a load (every chunk fetched and its hash checked). The local store's save and load are the reference.

    .venv/bin/python benchmarks/object_store.py                           # ~130 MB of weights, concurrency 1 and 16
    .venv/bin/python benchmarks/object_store.py --experts 128 --concurrency 1 4 16 64 --json runs/store.json
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import torch

from peer_model.model import PEERTransformer
from service.settings import Settings
from service.store.store import Store

BUCKET = "peer-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="bench",
                          aws_secret_access_key="bench", region_name="us-east-1")
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return server
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.2)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(store: Store, model: PEERTransformer, nbytes: int) -> dict:
    first_s, stats = timed(lambda: store.save_model("versions/a", model))
    again_s, again = timed(lambda: store.save_model("versions/b", model))
    load_s, loaded = timed(lambda: store.load_model("versions/a"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    mb = nbytes / 1e6
    return {"chunks": stats.chunks, "save_s": round(first_s, 2), "save_MB_s": round(mb / first_s, 1),
            "resave_s": round(again_s, 2), "resave_new_bytes": again.new_bytes,
            "load_s": round(load_s, 2), "load_MB_s": round(mb / load_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=256, help="sqrt of the pool size (experts = N²)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    settings = Settings(d_model=args.d_model, n_layers=2, n_heads=4, d_ff=4 * args.d_model,
                        peer_experts=args.experts ** 2, peer_layers="1", bootstrap_corpus="")
    model = PEERTransformer(settings.fresh_model_config())
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"model: {nbytes / 1e6:.0f} MB of weights, chunks of {args.chunk_bytes} bytes, torch threads "
          f"{torch.get_num_threads()}")
    rows = []
    for _ in range(2):  # the first round pays one-off costs (imports, allocator): not reported
        with tempfile.TemporaryDirectory() as tmp:
            local = measure(Store(Path(tmp), args.chunk_bytes), model, nbytes)
    rows.append({"store": "local", **local})
    port = free_port()
    server = start_moto(port)
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench",
                   "client_kwargs": {"region_name": "us-east-1"}}
        for concurrency in args.concurrency:
            store = Store(f"s3://{BUCKET}/{uuid.uuid4().hex}", args.chunk_bytes, options, concurrency)
            rows.append({"store": f"s3 (moto), concurrency {concurrency}", **measure(store, model, nbytes)})
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait(10)
    print("\n| store | chunks | first save | MB/s | save again (all reused) | load | MB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['store']} | {r['chunks']} | {r['save_s']} s | {r['save_MB_s']} | {r['resave_s']} s "
              f"({r['resave_new_bytes']} new bytes) | {r['load_s']} s | {r['load_MB_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "weights_bytes": nbytes,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
