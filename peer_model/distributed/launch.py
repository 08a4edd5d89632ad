"""Starting N training processes with torchrun, and joining their process group from inside one.

``peer train --nproc N ...`` re-runs itself as ``python -m torch.distributed.run --standalone
--nproc-per-node N -m peer_model.cli train ...`` (one machine; torchrun's own options, e.g. several
machines, work by calling it directly). Each process finds torchrun's environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT), joins the group (NCCL on GPUs, one per local rank; gloo on CPUs) and trains
its shard.
"""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from .shards import ColumnShards


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_processes(nproc: int, argv: list[str]) -> int:
    """``python -m peer_model.cli *argv`` on ``nproc`` processes of this machine; their exit status.
    ``--nproc`` is taken out of ``argv`` (torchrun reads it as its own ``--nproc-per-node``); a process
    knows it is one of many from torchrun's environment."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "peer_model.cli", *_without_nproc(argv)]
    return subprocess.run(command, check=False).returncode


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
        elif arg == "--nproc":
            skip = True
        else:
            kept.append(arg)
    return kept


def join_process_group(device: str = "auto", timeout_s: float = 1800.0) -> tuple[ColumnShards, str]:
    """Join torchrun's group; returns the shards (the whole group) and this process' device:
    ``cuda:LOCAL_RANK`` when ``device`` is "auto" or "cuda" and CUDA is there, else ``device``."""
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    elif device == "auto":
        device = "cpu"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return ColumnShards(), device
