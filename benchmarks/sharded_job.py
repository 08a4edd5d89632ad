"""A service training job's continual stage on one process against N stage processes (PEER_TRAIN_NPROC).
BENCHMARKS.md section 9.

The service's default stage (replay 50% of an earlier corpus, distillation to the parent, growth keyed on the
new corpus) of the service's default fresh model (d 192, 4 blocks, 128² experts, h 4, k 16), first trained on
the earlier corpus, runs the same steps and global batch:

* in process, as PEER_TRAIN_NPROC=1 runs it, on ``--threads`` torch threads (a worker's cores);
* through service/jobs/sharded_stage.py on N processes sharing those cores (``threads // N`` threads each):
  what a job pays on top of the training itself (starting the processes, handing the parent over as a
  checkpoint, taking the child back) is in the wall time.

Reported per run: the wall time of the whole stage, the steady training speed (tokens per second over the
log records after the first, so start-up is excluded) and both as ratios to the in-process run.

    python benchmarks/sharded_job.py                         # 60 steps, batch 16 × 128, 1 vs 2 processes
    python benchmarks/sharded_job.py --nproc 2 4 --steps 100
"""
from __future__ import annotations

import argparse
import time

import torch

from peer_model.continual import ContinualOptions, continual_stage
from peer_model.corpora import load_corpus
from peer_model.model import PEERTransformer
from peer_model.train import TokenData, TrainConfig, train
from service.jobs.sharded_stage import run_sharded_stage
from service.settings import Settings


def steady_tokens_per_s(history: list[dict]) -> float:
    """Mean of the logged speeds after the first record (which carries the start-up)."""
    speeds = [record["tokens_per_s"] for record in history[1:] if "tokens_per_s" in record]
    return sum(speeds) / len(speeds) if speeds else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--base-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    old = TokenData.from_text(load_corpus("shakespeare", max_bytes=1_000_000))
    new = TokenData.from_text(load_corpus("python-docs", max_bytes=1_000_000))
    torch.manual_seed(0)
    parent = PEERTransformer(Settings().fresh_model_config())
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-3, expert_lr=3e-3,
                      warmup_steps=5, eval_every=10**9, log_every=10, device="cpu")
    train(parent, old, None, TrainConfig(steps=args.base_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                         warmup_steps=10, eval_every=10**9, log_every=10**9, device="cpu"))
    options = ContinualOptions("replay", new_experts=4096, replay_fraction=0.5, distill_weight=1.0, train=cfg)
    print(f"stage: {args.steps} steps of {args.batch_size} × {args.seq_len} tokens, {args.threads} threads in all")

    start = time.perf_counter()
    history: list[dict] = []
    continual_stage(parent, new, [old], options, tag="new", on_log=history.append)
    base_wall, base_speed = time.perf_counter() - start, steady_tokens_per_s(history)
    print("| processes | threads each | wall s | × 1 process | tokens/s (steady) | × 1 process |")
    print("|---|---|---|---|---|---|")
    print(f"| 1 (in process) | {args.threads} | {base_wall:.1f} | 1.00 | {base_speed:,.0f} | 1.00 |")
    for processes in args.nproc:
        threads = max(1, args.threads // processes)
        start = time.perf_counter()
        outcome = run_sharded_stage(parent, new, [old], options, "new", processes, threads, "cpu",
                                    on_log=lambda record: None, should_stop=lambda: False)
        wall, speed = time.perf_counter() - start, steady_tokens_per_s(outcome.train_result.history)
        print(f"| {processes} | {threads} | {wall:.1f} | {wall / base_wall:.2f} | {speed:,.0f} | "
              f"{speed / base_speed:.2f} |", flush=True)


if __name__ == "__main__":
    main()
