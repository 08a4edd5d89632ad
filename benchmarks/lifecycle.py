"""What the data lifecycle saves: bytes stored per version with content-addressed chunks, and rows read by
/v1/experts/utilization with the usage roll-ups.

storage: the service's own job functions (ingest, train, publish) on the embedded default (SQLite, a local
store) under a temporary PEER_HOME, with the service's default pool shape (d 192, 4 blocks, 128² experts in
the middle one, 4,096 new experts per job) and short jobs (the bytes do not depend on the step count as long
as every trainable tensor moves). Version 1 (fresh) is pre-trained on a first slice of Shakespeare (naive:
every tensor changes), then each job below trains the active version on a further slice. For every
published version: the bytes of a plain checkpoint (peer_model's ``model.safetensors`` + config, what every
version cost before chunking) and the bytes the chunked save added to the store (new chunks + manifest
directory), and the new segment's share (its rows of both expert tables).

usage: ``expert_usage`` rows as the engine writes them (one per flush window of PEER_USAGE_FLUSH_SECONDS and
PEER layer; sparse counters of a 128² pool), a day of them by default; then the utilization of one layer
read as before the roll-ups (every raw row, summed) and as now (the roll-up row + the windows not folded yet),
rows read and milliseconds, before and after ``fold_usage``; the two answers are checked equal.

    .venv/bin/python benchmarks/lifecycle.py                      # both parts (12 minutes on 2 busy cores)
    .venv/bin/python benchmarks/lifecycle.py --part usage --windows 8640 --database-url postgresql+psycopg://...
    .venv/bin/python benchmarks/lifecycle.py --json runs/lifecycle.json
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
from sqlalchemy import select

from peer_model.checkpoint import save_checkpoint
from peer_model.corpora import load_corpus
from service.context import ServiceContext
from service.db.migrate import upgrade
from service.db.models import ExpertUsage, Job, PoolVersion, utcnow
from service.db.session import transaction
from service.jobs.ingest import parse_upload, run_ingest_job
from service.jobs.train import run_train_job
from service.jobs.uploads import accept_corpus
from service.serving.engine import decode_usage, encode_usage
from service.serving.usage import fold_usage, usage_total
from service.settings import Settings
from service.store.versions import ensure_initial_version

JOBS = {  # name → training options of the job (the first one pre-trains the fresh version 1)
    "pre-train version 1 (naive)": {"activate": "always"},
    "grow_freeze_protect": {"strategy": "grow_freeze_protect", "activate": "always"},
    "grow_freeze_protect, dense frozen": {"strategy": "grow_freeze_protect", "train_dense": False, "activate": "always"},
    "replay (the default)": {"strategy": "replay", "activate": "always"},
}


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def store_bytes(ctx: ServiceContext) -> int:
    return tree_bytes(ctx.store.root / "chunks") + tree_bytes(ctx.store.root / "versions")


def run_job(ctx: ServiceContext, name: str, text: str, options: dict) -> int:
    data = text.encode()
    with transaction(ctx.sessions) as session:
        _, ingest = accept_corpus(ctx, session, name, parse_upload(data, "text", len(data)), text, "text", True, options)
    started: list[Job] = []
    run_ingest_job(ctx, ingest.id, started.append)
    run_train_job(ctx, started[0].id)
    with ctx.sessions() as session:
        job = session.get(Job, started[0].id)
        if job.state != "succeeded":
            raise SystemExit(f"job {job.id} {job.state}: {job.error}")
        return job.result_version_id


def storage(args) -> list[dict]:
    home = Path(tempfile.mkdtemp(prefix="peer-lifecycle-"))
    settings = Settings(home=home, base_model="fresh", bootstrap_corpus="", train_steps=args.steps, train_batch_size=8,
                        eval_max_batches=2, keep_versions=100)
    upgrade(settings.resolved_database_url)
    ctx = ServiceContext.from_settings(settings)
    ensure_initial_version(ctx)
    text = load_corpus("shakespeare", max_bytes=args.corpus_bytes * len(JOBS))
    rows = []
    for index, (name, options) in enumerate(JOBS.items()):
        before = store_bytes(ctx)
        started = time.perf_counter()
        version_id = run_job(ctx, f"slice {index}", text[index * args.corpus_bytes:(index + 1) * args.corpus_bytes],
                             options)
        seconds = time.perf_counter() - started
        added = store_bytes(ctx) - before
        with ctx.sessions() as session:
            version = session.get(PoolVersion, version_id)
            key, parent = version.checkpoint, session.get(PoolVersion, version.parent_id)
            grown = sum(version.experts[k] - parent.experts.get(k, 0) for k in version.experts)
        model = ctx.store.load_model(key)
        plain_dir = home / "plain" / str(version_id)
        save_checkpoint(model, plain_dir)
        d = model.config.d_model
        rows.append({"job": name, "version": version_id, "plain_bytes": tree_bytes(plain_dir), "chunked_bytes": added,
                     "segment_bytes": grown * d * 2 * 4, "seconds": round(seconds, 1)})
        row = rows[-1]
        print(f"{name:38s} v{version_id}: plain {row['plain_bytes'] / 1e6:6.2f} MB, chunked +{added / 1e6:6.2f} MB "
              f"({added / row['plain_bytes']:.0%}); new segment {row['segment_bytes'] / 1e6:.2f} MB", flush=True)
    ctx.close()
    return rows


def measure(ctx: ServiceContext, version: PoolVersion, read) -> tuple[torch.Tensor, int, float]:
    """(counts, rows read, milliseconds) of ``read(session) -> (counts, rows)``."""
    with ctx.sessions() as session:
        started = time.perf_counter()
        counts, rows = read(session)
        return counts, rows, (time.perf_counter() - started) * 1000


def usage(args) -> dict:
    home = Path(tempfile.mkdtemp(prefix="peer-usage-"))
    settings = Settings(home=home, database_url=args.database_url, base_model="fresh", bootstrap_corpus="")
    upgrade(settings.resolved_database_url)
    ctx = ServiceContext.from_settings(settings)
    ensure_initial_version(ctx)
    with ctx.sessions() as session:
        version = session.scalars(select(PoolVersion).order_by(PoolVersion.id.desc())).first()
    layer, experts = next((int(k), n) for k, n in version.experts.items())
    rng = random.Random(0)
    start = utcnow() - timedelta(seconds=args.windows * settings.usage_flush_seconds)
    started = time.perf_counter()
    for first in range(0, args.windows, 1000):
        with transaction(ctx.sessions) as session:
            for index in range(first, min(first + 1000, args.windows)):
                counts = torch.zeros(experts, dtype=torch.long)
                ids = torch.tensor(rng.sample(range(experts), args.active_experts))
                counts[ids] = torch.randint(1, 20, (args.active_experts,))
                begin = start + timedelta(seconds=index * settings.usage_flush_seconds)
                session.add(ExpertUsage(version_id=version.id, layer=layer, window_start=begin,
                                        window_end=begin + timedelta(seconds=settings.usage_flush_seconds),
                                        tokens=int(counts.sum()) // 16, counts=encode_usage(counts)[0]))
    print(f"{args.windows} windows written in {time.perf_counter() - started:.1f} s", flush=True)

    def raw(session):  # what /v1/experts/utilization did before the roll-ups
        counts, rows = torch.zeros(experts, dtype=torch.long), 0
        for row in session.scalars(select(ExpertUsage).where(ExpertUsage.version_id == version.id,
                                                             ExpertUsage.layer == layer)):
            counts += decode_usage(row.counts, experts)
            rows += 1
        return counts, rows

    def rolled(session):  # now: the roll-up row and the windows not folded yet
        total = usage_total(session, version.id, layer)
        rows = len(total.parts)  # one part per row read, until the counts are merged
        return decode_usage(total.counts, experts), rows

    result = {"windows": args.windows, "active_experts_per_window": args.active_experts,
              "database": ctx.engine.dialect.name}
    reference, rows, ms = measure(ctx, version, raw)
    result["raw"] = {"rows_read": rows, "ms": round(ms, 1)}
    for phase in ("before_fold", "after_fold"):
        if phase == "after_fold":
            started = time.perf_counter()
            folded = fold_usage(ctx.sessions, settings.usage_bucket_seconds)
            result["fold"] = {"rows": folded, "seconds": round(time.perf_counter() - started, 1)}
        counts, rows, ms = measure(ctx, version, rolled)
        assert torch.equal(counts, reference), "the roll-up must answer what the raw rows sum to"
        result[phase] = {"rows_read": rows, "ms": round(ms, 1)}
    print(json.dumps(result, indent=2), flush=True)
    ctx.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["storage", "usage", "all"], default="all")
    parser.add_argument("--steps", type=int, default=20, help="training steps per job")
    parser.add_argument("--corpus-bytes", type=int, default=200_000, help="Shakespeare bytes per job")
    parser.add_argument("--windows", type=int, default=8640, help="usage windows (8,640 = a day at 10 s)")
    parser.add_argument("--active-experts", type=int, default=2000, help="non-zero counters per window")
    parser.add_argument("--database-url", help="default: SQLite under a temporary PEER_HOME")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {}
    if args.part in ("storage", "all"):
        report["storage"] = storage(args)
    if args.part in ("usage", "all"):
        report["usage"] = usage(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
