"""Does the best learning rate move with the width and the pool size? Standard against MSSP.

For each parameterization (``ModelConfig.parameterization``: "standard", "mssp"), each pool size and
each width, a fresh byte-level PEER model (2 blocks, PEER in block 1) trains on the same Shakespeare
text at each learning rate of a grid (one knob: ``lr`` = ``expert_lr`` = η; under mssp the per-group
multipliers of peer_model/parameterization.py apply on top, relative to width ``--base-width``), then
reports bits per byte on the same held-out text. The optimum holds still when every curve of a panel
bottoms out at the same η.

    .venv/bin/python benchmarks/lr_transfer.py --threads 1      # 3 widths × 2 pools × 6 rates × 300 steps: 45 min*
    .venv/bin/python benchmarks/lr_transfer.py --threads 1 --steps 150 --lrs 1e-3,2e-3,4e-3,8e-3,1.6e-2  # 29 min*
    .venv/bin/python benchmarks/lr_transfer.py --size tiny      # a 1-minute check

(* one thread on 2 cores shared with other work; BENCHMARKS.md 13 has both sweeps.)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from peer_model.config import ModelConfig, PEERConfig
from peer_model.corpora import load_corpus, split_train_val
from peer_model.model import PEERTransformer
from peer_model.train import TokenData, TrainConfig, evaluate_bpb, train

from common import add_threads_argument, parser_for, setup_torch

PARAMETERIZATIONS = ("standard", "mssp")


@dataclass(frozen=True)
class Grid:
    widths: tuple[int, ...]
    sides: tuple[int, ...]  # PEER grid sides: pools of side² experts
    lrs: tuple[float, ...]
    steps: int
    batch_size: int
    seq_len: int
    eval_batches: int
    max_bytes: int


GRIDS = {
    "tiny": Grid((32, 64), (16,), (3e-3, 1e-2), 20, 8, 64, 2, 200_000),
    "small": Grid((32, 64, 128), (128, 32), (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2), 300, 8, 128, 8, 1_000_000),
}


def config_for(d: int, side: int, parameterization: str, base_width: int, seq_len: int) -> ModelConfig:
    return ModelConfig(d_model=d, n_layers=2, n_heads=max(2, d // 64), d_ff=4 * d, max_seq_len=seq_len,
                       peer=PEERConfig(num_experts=side**2, heads=4, top_k=min(16, side), d_key=64),
                       parameterization=parameterization, mssp_base_width=base_width)


def run(parameterization: str, d: int, side: int, lr: float, grid: Grid, base_width: int,
        data: TokenData, val: TokenData) -> dict:
    torch.manual_seed(0)
    model = PEERTransformer(config_for(d, side, parameterization, base_width, grid.seq_len))
    cfg = TrainConfig(steps=grid.steps, batch_size=grid.batch_size, seq_len=grid.seq_len, lr=lr, expert_lr=lr,
                      warmup_steps=grid.steps // 10, eval_every=grid.steps, eval_batches=1, device="cpu",
                      log_every=grid.steps)
    result = train(model, data, None, cfg)
    loss = result.history[-1]["loss"]
    bpb = evaluate_bpb(model, val, grid.seq_len, grid.batch_size, grid.eval_batches)
    return {"parameterization": parameterization, "d_model": d, "experts": side**2, "lr": lr,
            "val_bpb": round(bpb, 4) if math.isfinite(bpb) else None, "train_loss": round(loss, 4),
            "seconds": round(result.elapsed_s, 1)}


def optima(results: list[dict]) -> list[dict]:
    """The best η of every (parameterization, pool, width) curve."""
    best = {}
    for r in results:
        key = (r["parameterization"], r["experts"], r["d_model"])
        if r["val_bpb"] is not None and (key not in best or r["val_bpb"] < best[key]["val_bpb"]):
            best[key] = r
    return [best[k] for k in sorted(best)]


def print_tables(results: list[dict]) -> None:
    lrs = sorted({r["lr"] for r in results})
    print("\n| parameterization | experts | d_model | " + " | ".join(f"η={lr:g}" for lr in lrs) + " | best η |")
    print("|---|---:|---:|" + "---:|" * (len(lrs) + 1))
    for b in optima(results):
        cells = {r["lr"]: r["val_bpb"] for r in results if all(r[k] == b[k] for k in ("parameterization",
                                                                                          "experts", "d_model"))}
        print(f"| {b['parameterization']} | {b['experts']:,} | {b['d_model']} | " + " | ".join(
            ("**%.3f**" % cells[lr] if lr == b["lr"] else "%.3f" % cells[lr]) if cells.get(lr) is not None
            else "" for lr in lrs) + f" | {b['lr']:g} |")
    print("\nspread of the best η over widths (log2 of max / min; 0 = the optimum holds still):")
    for p in PARAMETERIZATIONS:
        for n in sorted({r["experts"] for r in results}):
            etas = [b["lr"] for b in optima(results) if b["parameterization"] == p and b["experts"] == n]
            if etas:
                print(f"  {p}, {n:,} experts: best η {', '.join(f'{e:g}' for e in etas)}; "
                      f"spread {math.log2(max(etas) / min(etas)):.1f} octaves")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    pools = sorted({r["experts"] for r in results})
    fig, axes = plt.subplots(len(PARAMETERIZATIONS), len(pools), figsize=(5 * len(pools), 7), squeeze=False,
                             sharey=True)
    for i, p in enumerate(PARAMETERIZATIONS):
        for j, n in enumerate(pools):
            ax = axes[i][j]
            for d in sorted({r["d_model"] for r in results}):
                rows = sorted((r for r in results if r["parameterization"] == p and r["experts"] == n
                               and r["d_model"] == d and r["val_bpb"] is not None), key=lambda r: r["lr"])
                if rows:
                    line, = ax.plot([r["lr"] for r in rows], [r["val_bpb"] for r in rows], marker="o", label=f"d {d}")
                    best = min(rows, key=lambda r: r["val_bpb"])
                    ax.plot([best["lr"]], [best["val_bpb"]], marker="*", markersize=14, color=line.get_color())
            ax.set_xscale("log", base=2)
            lrs = sorted({r["lr"] for r in results})
            ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.set_title(f"{p}, {n:,} experts")
            ax.set_xlabel("learning rate η (lr = expert_lr)")
            ax.set_ylabel("validation bits per byte")
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--size", choices=sorted(GRIDS), default="small")
    parser.add_argument("--base-width", type=int, default=128, help="mssp's base width d0 (ModelConfig.mssp_base_width)")
    add_threads_argument(parser)
    parser.add_argument("--steps", type=int, help="training steps per run (default: the size's)")
    parser.add_argument("--lrs", help="comma-separated learning rates (default: the size's)")
    parser.add_argument("--sides", help="comma-separated PEER grid sides, pools of side² (default: the size's)")
    parser.add_argument("--json", default="runs/lr_transfer.json")
    parser.add_argument("--plot", default="docs/lr-transfer.png")
    parser.add_argument("--report", metavar="JSON", help="only print the tables and draw the plot of a saved sweep "
                        "(--json is written after every run, so a sweep cut short keeps its runs)")
    args = parser.parse_args()
    if args.report:
        runs = json.loads(Path(args.report).read_text())["runs"]
        print_tables(runs)
        plot(runs, Path(args.plot))
        return
    setup_torch(args.threads)
    grid = replace(GRIDS[args.size], **{name: value for name, value in (
        ("steps", args.steps), ("lrs", args.lrs and tuple(float(v) for v in args.lrs.split(","))),
        ("sides", args.sides and tuple(int(v) for v in args.sides.split(",")))) if value})
    started = time.perf_counter()
    train_text, val_text = split_train_val(load_corpus("shakespeare", max_bytes=grid.max_bytes))
    data, val = TokenData.from_text(train_text), TokenData.from_text(val_text)
    results = []
    for side in grid.sides:
        for d in grid.widths:
            for p in PARAMETERIZATIONS:
                for lr in grid.lrs:
                    row = run(p, d, side, lr, grid, args.base_width, data, val)
                    results.append(row)
                    print(f"{p} experts={side**2} d={d} lr={lr:g}: {row['seconds']} s, val {row['val_bpb']} bpb",
                          flush=True)
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps({"size": args.size, "base_width": args.base_width,
                                                           "runs": results}, indent=2))
    print_tables(results)
    print(f"\ntotal {math.ceil((time.perf_counter() - started) / 60)} min; torch threads {torch.get_num_threads()}")
    plot(results, Path(args.plot))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
