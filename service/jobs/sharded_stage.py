"""A training job's continual stage on several processes that share out the expert tables (PEER_TRAIN_NPROC > 1).

The job's own process (a worker, or serve's inline worker) stays out of the process group: it owns the job
(lease, heartbeat, cancellation, evaluation, publishing) and starts ``PEER_TRAIN_NPROC`` stage processes
(``python -m service.jobs.sharded_stage DIR RANK SIZE``) that join a group of their own, each loading only its
columns of the parent's expert tables (peer_model/distributed), and run
:func:`peer_model.continual.continual_stage` together, each on its rows of every batch. They talk to the job's
process through a private work directory:

    parent/          the parent, a plain checkpoint (written by the job's process)
    stage.pt         the new and earlier corpora's tokens, the stage options and tag, the seed
    progress.jsonl   one line per training log record (process 0)
    stop             created by the job's process: cancelled, or the worker is shutting down
    child/           the trained child, one expert file per process (peer_model/distributed/checkpoint.py)
    result.json      steps, tokens, seconds, stopped early (process 0)
    rank-N.log       each process' output, shown in the job's error when it fails

Every process polls the stop file's verdict together (process 0 reads it and sends it to the rest), so they
stop at the same step; process 0 also stops when the job's process is gone (killed), so no stage outlives
its job. A process that fails fails the job, with its output; the others are stopped. A stop has a deadline
(PEER_TRAIN_STOP_GRACE_SECONDS): a process that does not reach its next step by then (stuck in a collective
with one that hangs) is killed with the rest, instead of holding the job "cancelling" for the collective
timeout. Processes already started when a later one cannot be are killed at once.

The job's process holds a lock on ``owner.lock`` in the work directory for as long as the stage runs, so a
directory whose lock is free belongs to a process that is gone (a worker killed with SIGKILL, OOM): it holds the
parent's checkpoint and the corpora's tokens (the text of corpora deleted since, too), and
:func:`sweep_work_directories` removes it, at each stage's start and at the worker's.

The child is put back together in the job's process for evaluation and publishing: the API serves the whole
pool from one process (PEER_MAX_POOL_EXPERTS), so what sharding buys here is training memory (optimizer
state, activations and gradients spread over the processes) and throughput, not a pool larger than a host.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from peer_model.checkpoint import load_checkpoint, save_checkpoint
from peer_model.continual import ContinualOptions, continual_stage
from peer_model.distributed import ColumnShards, load_sharded_checkpoint, save_sharded_checkpoint
from peer_model.model import PEERTransformer
from peer_model.train import TokenData, TrainResult

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # the job's process reads progress and checks the job this often
LOG_TAIL_CHARS = 4000


class StageFailed(RuntimeError):
    """A stage process exited with an error; the message carries its output's tail."""


@dataclass
class ShardedStageResult:
    child: PEERTransformer | None  # None when the stage stopped early (nothing to publish)
    train_result: TrainResult


def run_sharded_stage(parent: PEERTransformer, new_train: TokenData, old_train: list[TokenData],
                      options: ContinualOptions, tag: str, processes: int, threads: int, device: str,
                      on_log, should_stop, timeout_s: float = 1800.0,
                      stop_grace_s: float = 60.0) -> ShardedStageResult:
    """The stage on ``processes`` processes of this machine (``threads`` torch threads each; ``device``: the
    service's, "auto" giving every process a GPU of its own when there are as many). ``on_log(record)`` and
    ``should_stop()`` run here, in the job's process; ``should_stop`` may raise (the worker is shutting down):
    the processes are stopped and the exception goes on. ``timeout_s``: the process group's collective timeout;
    ``stop_grace_s``: how long the processes get to stop once asked, before they are killed."""
    if options.train.batch_size % processes:
        raise ValueError(f"the batch size {options.train.batch_size} must be a multiple of the {processes} "
                         "training processes (PEER_TRAIN_BATCH_SIZE, PEER_TRAIN_NPROC)")
    sweep_work_directories()
    with work_directory() as work:
        save_checkpoint(parent, work / "parent")
        torch.save({"new": new_train, "old": old_train, "options": options, "tag": tag, "device": device,
                    "threads": threads, "timeout_s": timeout_s, "job_pid": os.getpid()}, work / "stage.pt")
        children: list[subprocess.Popen] = []
        try:
            for rank in range(processes):
                children.append(_start(work, rank, processes))
        except BaseException:
            _kill_all(children)  # waiting for the rest of their group: they would never reach a step to stop at
            raise
        try:
            stopped = _follow(work, children, on_log, should_stop, stop_grace_s)
        except StageFailed:
            _kill_all(children)  # the others wait for the failed one in a collective: they cannot stop in step
            raise
        finally:
            _stop_all(work, children, stop_grace_s)
        if stopped or not (work / "result.json").exists():  # asked to stop: none or some of them finished a step
            return ShardedStageResult(None, TrainResult(steps_done=0, tokens_seen=0, final_val_bpb=None, history=[],
                                                        elapsed_s=0.0, stopped_early=True))
        result = json.loads((work / "result.json").read_text())
        train_result = TrainResult(steps_done=result["steps_done"], tokens_seen=result["tokens_seen"],
                                   final_val_bpb=None, history=result["history"], elapsed_s=result["elapsed_s"],
                                   stopped_early=result["stopped_early"])
        child = None if train_result.stopped_early else load_checkpoint(work / "child", _job_device(parent))
        return ShardedStageResult(child, train_result)


WORK_PREFIX = "peer-stage-"
OWNER_LOCK = "owner.lock"


@contextmanager
def work_directory() -> Iterator[Path]:
    """A private work directory under the system's temporary folder, locked by this process (its lock file is
    put in place already locked, so a sweep never sees it unlocked while we live), removed at the end."""
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    lock = open(work / f".{OWNER_LOCK}", "wb")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.replace(work / f".{OWNER_LOCK}", work / OWNER_LOCK)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock.close()


def sweep_work_directories() -> list[str]:
    """Remove the work directories whose owner is gone (their lock is free); returns their names."""
    swept = []
    for work in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"):
        try:
            with open(work / OWNER_LOCK, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live owner: BlockingIOError
                shutil.rmtree(work, ignore_errors=True)
        except OSError:  # no lock file (not one of ours, or being set up), or a live owner's
            continue
        swept.append(work.name)
        log.warning("removed the work directory %s of a training stage whose process is gone", work)
    return swept


def _job_device(model: PEERTransformer) -> torch.device:
    return next(model.parameters()).device


def _start(work: Path, rank: int, size: int) -> subprocess.Popen:
    output = open(work / f"rank-{rank}.log", "wb")
    try:
        # a session of their own: a Ctrl-C meant for the worker reaches the worker, which stops them in step
        return subprocess.Popen([sys.executable, "-m", "service.jobs.sharded_stage", str(work), str(rank), str(size)],
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        output.close()


def _follow(work: Path, children: list[subprocess.Popen], on_log, should_stop, stop_grace_s: float) -> bool:
    """Until every process has exited: hand their log records to ``on_log``, poll ``should_stop`` and pass a
    stop on; raise :class:`StageFailed` when one fails. Returns whether a stop was asked for: then the
    processes get ``stop_grace_s`` to end (how is no failure: one may abort as the group comes apart), and are
    killed after."""
    progress, offset, stop = work / "progress.jsonl", 0, work / "stop"
    deadline = None  # set by a stop request
    while True:
        offset = _read_progress(progress, offset, on_log)
        codes = [child.poll() for child in children]
        if deadline is not None:
            if all(code is not None for code in codes):
                return True
            if time.monotonic() > deadline:
                log.warning("the training stage did not stop within %.0f s: its processes are killed", stop_grace_s)
                _kill_all(children)
                return True
            time.sleep(POLL_SECONDS)
            continue
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            # a process killed by a signal is the cause; the others then fail on the lost connection to it
            failed.sort(key=lambda failure: (failure[1] >= 0, failure[0]))
            statuses = ", ".join(f"process {rank} exit status {code}" for rank, code in failed)
            rank = failed[0][0]
            tail = (work / f"rank-{rank}.log").read_text(errors="replace")[-LOG_TAIL_CHARS:]
            raise StageFailed(f"sharded training failed on {len(failed)} of {len(children)} processes ({statuses}); "
                              f"process {rank}'s output:\n{tail}")
        if all(code == 0 for code in codes):
            _read_progress(progress, offset, on_log)
            return False
        try:
            if should_stop():
                stop.touch()
                deadline = time.monotonic() + stop_grace_s
        except BaseException:
            stop.touch()
            raise
        time.sleep(POLL_SECONDS)


def _read_progress(path: Path, offset: int, on_log) -> int:
    """Hand every complete line after ``offset`` to ``on_log``; returns the new offset."""
    if not path.exists():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        on_log(json.loads(line))
    return offset + len(complete)


def _stop_all(work: Path, children: list[subprocess.Popen], stop_grace_s: float) -> None:
    """Processes still running (the job was stopped, or its process failed): asked to stop at their next
    step, killed after ``stop_grace_s``."""
    if all(child.poll() is not None for child in children):
        return
    (work / "stop").touch()
    deadline = time.monotonic() + stop_grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_all([child])


def _kill_all(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()


# ---- a stage process ------------------------------------------------------------------------------


def stage_process(work: Path, rank: int, size: int) -> None:
    spec = torch.load(work / "stage.pt", weights_only=False)  # written by the job's process, private to it
    torch.set_num_threads(spec["threads"])
    device = _process_device(spec["device"], rank, size)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{work / 'rendezvous'}", rank=rank,
                            world_size=size, timeout=timedelta(seconds=spec["timeout_s"]))
    try:
        shards = ColumnShards()
        parent = load_sharded_checkpoint(work / "parent", shards, device)
        options: ContinualOptions = spec["options"]
        options = replace(options, train=replace(options.train, device=device))
        torch.manual_seed(options.train.seed)  # growth draws the same rows on every process
        stage = continual_stage(parent, spec["new"], spec["old"], options, tag=spec["tag"],
                                on_log=_progress_writer(work, rank), should_stop=_stop_poll(work, rank, shards,
                                                                                              spec["job_pid"]),
                                shards=shards)
        result = stage.train_result
        if not result.stopped_early:
            save_sharded_checkpoint(stage.child, work / "child", shards)
        if rank == 0:
            (work / "result.json").write_text(json.dumps({
                "steps_done": result.steps_done, "tokens_seen": result.tokens_seen, "elapsed_s": result.elapsed_s,
                "stopped_early": result.stopped_early, "history": result.history}))
    finally:
        dist.destroy_process_group()


def _process_device(device: str, rank: int, size: int) -> str:
    """A GPU of its own for every process (NCCL) when there are enough and ``device`` allows; else the CPU."""
    gpus = torch.cuda.device_count()
    if device in ("auto", "cuda") and gpus >= size:
        return f"cuda:{rank}"
    if device == "auto" or device == "cpu":
        return "cpu"
    raise ValueError(f"PEER_DEVICE={device} with {size} training processes needs a GPU per process; "
                     f"this machine has {gpus}")


def _progress_writer(work: Path, rank: int):
    def on_log(record: dict) -> None:
        if rank == 0:
            with open(work / "progress.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
    return on_log


def _stop_poll(work: Path, rank: int, shards: ColumnShards, job_pid: int):
    """Process 0's verdict (a stop requested, or the job's process gone), the same on every process."""
    stop = work / "stop"
    flag = torch.zeros(1, device="cuda" if dist.get_backend() == "nccl" else "cpu")

    def should_stop() -> bool:
        flag.fill_(float(rank == 0 and (stop.exists() or os.getppid() != job_pid)))
        return bool(shards.all_reduce_(flag, dist.ReduceOp.MAX).item())
    return should_stop


if __name__ == "__main__":
    stage_process(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
