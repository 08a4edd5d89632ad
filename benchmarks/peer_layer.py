"""One PEER training step (forward, backward, optimizer) against lucidrains' peer-pytorch.

Both layers: d = 256, h = 8 heads, k = 16 experts per head, 2,048 tokens a step, query BatchNorm
(ours) / none (theirs has none), product keys of 64 per half (our d_key = 128; their dim_key = 64),
softmax gates (their ``non_competing_scores=False``). Theirs trains with ``torch.optim.AdamW``; ours
with AdamW on the dense parameters and SparseRowAdam on the expert tables.

Timing: in one process, the two implementations alternate (ours, theirs, ours, theirs ...) and each
reports the median of its steps after a warm-up step, so both see the same machine state.
Peak memory: each implementation is built and stepped in a fresh child process that resets the
kernel's peak-RSS mark after imports (``/proc/self/clear_refs``) and reports ``VmHWM - VmRSS``.

    python benchmarks/peer_layer.py --sides 128 512 1024
    python benchmarks/peer_layer.py --sides 1024 --allocator default
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from peer_model.config import PEERConfig
from peer_model.optim import SparseRowAdam
from peer_model.peer import PEER
from peer_model.runtime import tune_allocator

from common import timed

D_MODEL, HEADS, TOP_K, D_KEY, TOKENS = 256, 8, 16, 128, 2048


def build(impl: str, side: int):
    """(layer, optimizers) for one implementation at N = side²."""
    torch.manual_seed(0)
    if impl == "ours":
        layer = PEER(D_MODEL, PEERConfig(num_experts=side * side, heads=HEADS, top_k=TOP_K, d_key=D_KEY))
        tables = [layer.expert_down, layer.expert_up]
        dense = [p for p in layer.parameters() if all(p is not t for t in tables)]
        return layer, [torch.optim.AdamW(dense, lr=1e-3), SparseRowAdam(tables, lr=1e-3)]
    from PEER_pytorch import PEER as TheirPEER

    layer = TheirPEER(D_MODEL, heads=HEADS, num_experts=side * side, num_experts_per_head=TOP_K,
                      dim_key=D_KEY // 2, non_competing_scores=False)
    return layer, [torch.optim.AdamW(layer.parameters(), lr=1e-3)]


def train_step(layer, optimizers, x, target) -> None:
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(layer(x), target).backward()
    for opt in optimizers:
        opt.step()


def time_steps(impl: str, side: int, steps: int) -> list[float]:
    layer, optimizers = build(impl, side)
    x, target = torch.randn(1, TOKENS, D_MODEL), torch.randn(1, TOKENS, D_MODEL)
    # one warm-up step (optimizer state, allocator), then ``steps`` timed ones
    times = timed(lambda: train_step(layer, optimizers, x, target), torch.device("cpu"), steps, warmup=1)
    del layer, optimizers
    gc.collect()
    return times


def peak_memory_child(impl: str, side: int, allocator: str) -> None:
    """Run in a child process: print the peak RSS growth (bytes) of building the layer and 2 steps."""
    if allocator == "tuned":
        tune_allocator()
    if impl == "theirs":
        import PEER_pytorch  # noqa: F401  (count its import in the baseline, not in the peak)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    baseline = _status_bytes("VmRSS")
    layer, optimizers = build(impl, side)
    x, target = torch.randn(1, TOKENS, D_MODEL), torch.randn(1, TOKENS, D_MODEL)
    for _ in range(2):
        train_step(layer, optimizers, x, target)
    print(json.dumps({"peak_bytes": _status_bytes("VmHWM") - baseline}))


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(impl: str, side: int, allocator: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--child", impl, str(side), "--allocator", allocator],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def training_flops(side: int) -> float:
    """Analytic FLOPs of one step: 3 × forward (backward ≈ 2 × forward), counting what is computed:
    query projection, scores of both sub-key halves, the k² candidate sums, and the h·k experts."""
    per_token = (
        2 * D_MODEL * HEADS * D_KEY  # query projection
        + 2 * HEADS * 2 * side * (D_KEY // 2)  # both halves scored against √N sub-keys
        + HEADS * TOP_K * TOP_K  # candidate sums
        + HEADS * TOP_K * 2 * 2 * D_MODEL  # u_i·x and g σ v_i for h·k experts
    )
    return 3 * per_token * TOKENS


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 512, 1024], help="√N values")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per implementation")
    parser.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                        help="glibc allocator policy for the whole process (both implementations)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.child[0], int(args.child[1]), args.allocator)
        return
    if args.allocator == "tuned":
        tune_allocator()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator={args.allocator}, "
          f"tokens/step={TOKENS}, d={D_MODEL}, h={HEADS}, k={TOP_K}")
    machine = matmul_gflops()
    print(f"machine fp32 matmul (2048³): {machine:.1f} GFLOP/s")
    columns = [("N", 9), ("ours s", 8), ("theirs s", 9), ("speed-up", 9), ("ours GiB", 9), ("theirs GiB", 10),
               ("mem ratio", 9), ("ours GFLOP/s", 12), ("theirs GFLOP/s", 14)]
    print(" ".join(f"{name:>{width}}" for name, width in columns))
    for side in args.sides:
        # children first: with the tuned allocator this process keeps the heap it grew while timing
        mem = {impl: peak_memory(impl, side, args.allocator) / 2**30 for impl in ("ours", "theirs")}
        times = {"ours": [], "theirs": []}
        for _ in range(args.rounds):
            for impl in times:
                times[impl] += time_steps(impl, side, args.steps)
        ours, theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
        flops = training_flops(side)
        print(f"{side}²{'':>3} {ours:8.3f} {theirs:9.3f} {theirs / ours:8.2f}x {mem['ours']:9.2f} "
              f"{mem['theirs']:10.2f} {mem['ours'] / mem['theirs']:9.2f} {flops / ours / 1e9:12.1f} "
              f"{flops / theirs / 1e9:14.1f}", flush=True)


if __name__ == "__main__":
    main()
