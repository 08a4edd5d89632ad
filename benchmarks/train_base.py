"""A default training job on the default base, on CPU: each phase's time, tokens/s, model FLOPs utilisation, memory.

What the service's train job does on version 1 (service/jobs/train.py, default settings and job options): the
retrofitted SmolLM2-135M-Instruct (``service.store.versions.base_model``), a new corpus of ``--corpus-bytes`` of real
text split as ingest splits it, the default strategy (replay + distillation + growth) replaying the parent's own
samples (a pretrained base's text is not in the store), then bits per byte of the child and the parent on the
validation split. Phases timed: sampling the replay windows, ``--steps`` training steps (the job's own shape, from
``job_train_config``), evaluation. The job's time is then sampling + the job's steps × the measured step time +
evaluation (``--steps`` below the job's: a projection, said so).

Model FLOPs utilisation: the FLOPs one training step executes (counted by ``torch.utils.flop_counter`` on one step:
every matmul and attention of the forward, the backward and the distillation teacher) × steps/s, against this
machine's fp32 matmul rate measured in the same run (a (2048 × 2048) · (2048 × 2048) ``torch.mm``, the best of 5).
Peak memory: the process's peak resident set.

    PYTHONPATH=. PEER_DATA_DIR=data/corpora .venv/bin/python benchmarks/train_base.py --threads 2
"""
from __future__ import annotations

import copy
import json
import resource
import sys
import time
from dataclasses import replace

import torch
from common import add_threads_argument, parser_for, setup_torch, stats, timed
from torch.utils.flop_counter import FlopCounterMode

from peer_model.continual import continual_stage, evaluate_all
from peer_model.continual.data import sample_replay
from peer_model.corpora import load_corpus, split_train_val
from peer_model.train import TokenData
from service.jobs.options import continual_options, parse_job_options
from service.settings import Settings
from service.store.versions import base_model

MATMUL_SIDE = 2048


def matmul_rate() -> float:
    """fp32 FLOP/s of a square ``torch.mm`` on this machine now (best of 5)."""
    a, b = torch.randn(MATMUL_SIDE, MATMUL_SIDE), torch.randn(MATMUL_SIDE, MATMUL_SIDE)
    return 2 * MATMUL_SIDE**3 / stats(timed(lambda: torch.mm(a, b), torch.device("cpu"), iters=5))["best_s"]


def seconds(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--corpus", default="python-docs")
    parser.add_argument("--corpus-bytes", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=0, help="training steps to run (0: the job's own)")
    parser.add_argument("--json", help="also write the results here")
    add_threads_argument(parser)
    args = parser.parse_args()
    setup_torch(args.threads)
    settings = Settings()
    rate_before = matmul_rate()
    parent, load_s = seconds(lambda: base_model(settings))
    train_text, val_text = split_train_val(load_corpus(args.corpus, max_bytes=args.corpus_bytes), settings.val_fraction)
    new_train, val = TokenData.from_text(train_text, parent.tokenizer), TokenData.from_text(val_text, parent.tokenizer)
    options = replace(continual_options(settings, parse_job_options({}), has_old_corpora=True, pretrained=True),
                      replay_source="parent")
    cfg = options.train
    job_steps = cfg.steps
    replay, replay_s = seconds(lambda: sample_replay(parent, options.generated_windows, cfg.seq_len, seed=cfg.seed + 3,
                                                     batch_size=options.generated_batch,
                                                     weights=options.generated_weights))
    print(f"load {load_s:.1f} s; replay: {options.generated_windows} windows of {cfg.seq_len} tokens sampled in "
          f"{replay_s:.1f} s", flush=True)

    steps = args.steps or job_steps
    run = replace(options, replay_source="corpora", train=replace(cfg, steps=steps, log_every=1))
    records = []
    stage, stage_s = seconds(lambda: continual_stage(parent, new_train, [replay], run, tag="bench",
                                                     on_log=lambda r: (records.append(r), print(r, flush=True))))
    timed_steps = records[1:] or records  # the first step pays for lazy set-up
    step_s = sum(cfg.batch_size * cfg.seq_len / r["tokens_per_s"] for r in timed_steps) / len(timed_steps)
    val_sets = {args.corpus: val}
    bpb, eval_s = seconds(lambda: (evaluate_all(stage.child, val_sets, cfg.seq_len, settings.train_batch_size,
                                                settings.eval_max_batches),
                                   evaluate_all(parent, val_sets, cfg.seq_len, settings.train_batch_size,
                                                settings.eval_max_batches)))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB, before counting's extra copies
    flops = step_flops(stage.child, new_train, replay, run)
    rate = max(rate_before, matmul_rate())
    tokens_per_s = cfg.batch_size * cfg.seq_len / step_s
    results = {
        "command": " ".join(sys.argv), "threads": torch.get_num_threads(), "corpus": args.corpus,
        "corpus_bytes": args.corpus_bytes, "train_tokens": len(new_train), "val_tokens": len(val),
        "job": {"steps": job_steps, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "strategy": options.strategy,
                "new_experts": options.new_experts, "generated_windows": options.generated_windows},
        "steps_run": steps, "load_s": load_s, "replay_s": replay_s, "step_s": step_s, "tokens_per_s": tokens_per_s,
        "eval_s": eval_s, "bpb": {"child": bpb[0], "parent": bpb[1]},
        "job_s": replay_s + job_steps * step_s + eval_s, "projected": steps < job_steps,
        "step_flop": flops, "matmul_flop_per_s": rate, "mfu": flops / step_s / rate,
        "peak_rss_gib": peak_rss,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def step_flops(child, new_train, replay, options) -> float:
    """FLOPs of one more training step of ``child`` with the stage's loss (one step, counted, not timed)."""
    one = replace(options, new_experts=0, train=replace(options.train, steps=1, warmup_steps=1))
    counter = FlopCounterMode(display=False)
    with counter:
        continual_stage(copy.deepcopy(child), new_train, [replay], one)
    return float(counter.get_total_flops())


if __name__ == "__main__":
    main()
