"""What the benchmark scripts share: their command line's common parts, the torch set-up of a run, one continual
stage's training loop, writing a figure, and timing a call after warm-up (CUDA events on a GPU, time.perf_counter
on CPU).

The scripts run as ``python benchmarks/<name>.py`` and import this module from their own folder.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from peer_model.runtime import tune_allocator
from peer_model.train import TrainConfig

# ---- the command line and the run's set-up -----------------------------------------------------------


def parser_for(doc: str) -> argparse.ArgumentParser:
    """A script's parser, described by the first line of its docstring."""
    return argparse.ArgumentParser(description=doc.split("\n")[0])


def add_stream_arguments(parser: argparse.ArgumentParser, sizes: Iterable[str], corpora: Iterable[str]) -> None:
    """``--size`` and ``--corpora``: the scripts that train on a stream of corpora (continual.py, retrofit.py)."""
    parser.add_argument("--size", choices=sorted(sizes), default="small")
    parser.add_argument("--corpora", default=",".join(corpora), help="comma-separated, in stream order")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")


def setup_torch(threads: int) -> None:
    """The allocator tuned for training (peer_model.runtime), and ``threads`` torch threads (0: torch's default)."""
    tune_allocator()
    if threads:
        torch.set_num_threads(threads)


def parse_stream_run(parser: argparse.ArgumentParser, sizes: dict) -> tuple[argparse.Namespace, object]:
    """The stream scripts' command line parsed, torch set up for the run (``--threads``), and the ``--size``."""
    args = parser.parse_args()
    setup_torch(args.threads)
    return args, sizes[args.size]


def stage_config(size, seed: int) -> TrainConfig:
    """One continual stage's training loop on CPU: ``size``'s steps, batch and window (continual.py, retrofit.py)."""
    return TrainConfig(steps=size.stage_steps, batch_size=size.batch_size, seq_len=size.seq_len, lr=3e-3,
                       expert_lr=1e-2, warmup_steps=max(1, size.stage_steps // 10), eval_every=10**9,
                       log_every=max(1, size.stage_steps // 4), device="cpu", seed=seed)


def save_figure(fig, path: str | Path) -> None:
    """``fig`` laid out and written to ``path`` (its folder made) at 110 dpi; says where."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ---- timing --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` calls: CUDA events on a GPU,
    time.perf_counter around a synchronised call on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def stats(times: list[float]) -> dict:
    return {"best_s": min(times), "median_s": statistics.median(times), "n": len(times)}
