"""The GPU path on one GPU, in one run (issue 14): copy bandwidth, the Triton expert mix against the
torch path, one PEER layer's training step against peer-pytorch 0.2.2, and the ``gpu-base`` preset's
training (bf16 parameters, fp32 optimizer state) and serving (continuous batching, eager against CUDA
graphs). Sized for one H200 in under 8 minutes; BENCHMARKS.md section 7 says what each number means.

Parts (each in its own try/except: a failure is printed and recorded, the other parts still run; a part
that would start after ``--budget-s`` seconds is skipped and recorded as such):

1. ``copy``: device-to-device copy of a 4 GiB bf16 tensor, (bytes read + written) / time, best of 10
   (CUDA events); and a bf16 8192³ matmul, best of 5, as the measured compute ceiling.
2. ``expert_mix``: N = 1024², d = 1024, h·k = 8·16 = 128 slots per token, 16,384 tokens, bf16 tables and
   activations, ids uniform over the whole pool, softmax gates per head. Forward and backward of the
   Triton kernels (``expert_mix_triton``) and of the torch path (``experts._ExpertMix``, what
   ``expert_mix`` runs with PEER_KERNELS=torch), best and median of 10 after warm-up. Bytes as the top
   of peer_model/kernels/expert_mix.py counts them: forward ``forward_bytes``; backward = the token
   kernel's expert rows and token I/O + the sparse rows written (2·R·d·b_t, R distinct rows); the row
   kernel's re-reads of x / grad_out per (token, slot) pair are recorded separately (they can hit L2).
   Achieved GB/s as a fraction of part 1's copy bandwidth; targets ≥ 85% forward, ≥ 60% backward. Both
   paths are checked against ``expert_mix_reference`` in fp32 on the first 512 tokens (max abs diff of
   the output and of every gradient), so a fast wrong kernel shows.
3. ``peer_layer``: one training step (forward, backward, optimizer) of our PEER layer (AdamW on the
   dense parameters, SparseRowAdam on the tables) and of peer-pytorch's (AdamW), as
   benchmarks/peer_layer.py builds them, at part 2's shape; fp32 parameters under bf16 autocast for both
   (what peer_model.train does on CUDA at param_dtype float32). Median step time of 5 after 2 warm-up
   steps, peak ``torch.cuda.max_memory_allocated`` growth over building the layer and all its steps.
   Targets: ≥ 10× faster, ≤ 0.5× the memory.
4. ``gpu_base``: the ``gpu-base`` preset trained by ``peer_model.train.train`` with
   TrainConfig(param_dtype="bfloat16") on random bytes, 8 × 2048 tokens a step, 5 timed steps after 2
   (compilation, optimizer state); model FLOP utilisation = tokens/s × count_flops(...).train_per_token
   / 989 TFLOP/s (the H200's dense bf16 datasheet peak; also given against part 1's matmul). Then
   serving with BatchDecoder at 1, 32 and 256 concurrent sequences (16-byte prompts, 64 greedy tokens
   each, EOS never sampled so every sequence runs its 64), eager and ``cuda_graphs=True``, each after a
   warm-up round at the same concurrency (which captures the graph bucket); decode tokens/s and the
   graphs/eager ratio.

Output: ``--out`` (JSON, rewritten after every part so a killed run keeps what it measured) and a
markdown table on stdout for BENCHMARKS.md.

``--small`` (the default without CUDA): the same code at tiny shapes (N = 64², d = 64, 256 tokens, a
2-block d-64 gpu-base), on CPU with time.perf_counter instead of CUDA events and the Triton kernels in
Triton's interpreter (TRITON_INTERPRET=1 is set before they are imported); bf16 training needs CUDA, so
the CPU smoke run trains in fp32. A smoke test of the script, not a measurement.

It imports only peer_model, torch, triton and (part 3) PEER_pytorch: no service, no `pip install -e .`.

On the device machine (no network; torch, triton, einops, numpy, sympy are there, peer-pytorch, einx
and frozendict are not), carry the wheels. Here, once (build/ is git-ignored):

    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 -d build/gpu-wheels \\
        peer-pytorch==0.2.2 einx==0.4.3 einops==0.8.2 frozendict==2.5.1

then run ``scripts/gpu_bench.sh`` there with ``build/gpu-wheels`` carried; it installs them with
``pip install --no-index --no-deps --target /tmp/site`` and runs, with PYTHONPATH=/tmp/site:.,

    python3 benchmarks/gpu.py --out $OUT/gpu.json

(if pip cannot run there, the script unpacks the wheels, all pure Python, into /tmp/site with
``python3 -m zipfile -e``: the same files). Without the wheels part 3 records "peer-pytorch not available" and the rest runs.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the kernels are built when their module is first imported: interpreter mode on CPU
    os.environ["TRITON_INTERPRET"] = "1"

import torch.nn.functional as F  # noqa: E402

from peer_model.batching import BatchDecoder  # noqa: E402
from peer_model.config import PEERConfig  # noqa: E402
from peer_model.experts import _ExpertMix, expert_mix_reference  # noqa: E402
from peer_model.flops import count_flops  # noqa: E402
from peer_model.generate import SamplingParams  # noqa: E402
from peer_model.model import PEERTransformer  # noqa: E402
from peer_model.optim import SparseRowAdam  # noqa: E402
from peer_model.peer import PEER  # noqa: E402
from peer_model.presets import preset_config  # noqa: E402
from peer_model.tokenizer import BOS, EOS, PAD, ByteTokenizer  # noqa: E402
from peer_model.train import TokenData, TrainConfig, build_optimizers, place_model, train  # noqa: E402

from common import stats, sync, timed  # noqa: E402  (benchmarks/common.py, beside this script)

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s, NVIDIA's H200 SXM datasheet (1,979 with sparsity)
GiB = 2**30


@dataclass
class Shapes:
    copy_bytes: int  # size of the copied tensor
    matmul: int  # n of the n³ bf16 matmul
    side: int  # √N
    d: int
    heads: int
    top_k: int
    d_key: int
    tokens: int  # expert mix and PEER layer
    check_tokens: int  # tokens compared against the reference
    iters: int  # timed repetitions of the expert mix
    layer_steps: int
    layer_warmup: int
    model_overrides: dict = field(default_factory=dict)
    batch: int = 8
    seq: int = 2048
    train_steps: int = 5
    train_warmup: int = 2
    concurrency: tuple[int, ...] = (1, 32, 256)
    prompt_len: int = 16
    gen_tokens: int = 64


FULL = Shapes(copy_bytes=4 * GiB, matmul=8192, side=1024, d=1024, heads=8, top_k=16, d_key=128, tokens=16384,
              check_tokens=512, iters=10, layer_steps=5, layer_warmup=2)
SMALL = Shapes(copy_bytes=64 * 2**20, matmul=256, side=64, d=64, heads=2, top_k=4, d_key=32, tokens=256,
               check_tokens=64, iters=2, layer_steps=2, layer_warmup=1,
               model_overrides=dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128,
                                    peer=PEERConfig(num_experts=32 * 32, heads=2, top_k=4, d_key=16)),
               batch=2, seq=64, train_steps=2, train_warmup=1, concurrency=(1, 4, 8), prompt_len=8, gen_tokens=8)


# ---- helpers -------------------------------------------------------------------------------------

class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.elapsed() > self.seconds


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> int:
    """Bytes allocated now, after the peak mark is reset to it (0 on CPU: no allocator statistics)."""
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_growth(device: torch.device, base: int) -> float | None:
    """GiB of peak allocation above ``base`` (None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / GiB


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.coalesce() if not grad.is_coalesced() else grad
    return grad.indices()[0], grad.values()


# ---- 1. copy bandwidth and matmul ----------------------------------------------------------------

def part_copy(shapes: Shapes, device: torch.device, budget: Budget) -> dict:
    n = shapes.copy_bytes // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = timed(lambda: dst.copy_(src), device, iters=10, warmup=2)
    moved = 2 * n * 2  # read + write
    out = {"bytes_moved": moved, **stats(times), "gb_per_s": moved / min(times) / 1e9,
           "gb_per_s_median": moved / statistics.median(times) / 1e9}
    del src, dst
    free(device)
    m = shapes.matmul
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(m, m, dtype=dtype, device=device), torch.randn(m, m, dtype=dtype, device=device)
    times = timed(lambda: a @ b, device, iters=5, warmup=2)
    out["matmul"] = {"size": m, "dtype": str(dtype).replace("torch.", ""), **stats(times),
                     "tflop_per_s": 2 * m**3 / min(times) / 1e12}
    print(f"  copy {out['gb_per_s']:,.0f} GB/s (best of 10, {moved / 1e9:.2f} GB moved); "
          f"{out['matmul']['dtype']} matmul {m}³ {out['matmul']['tflop_per_s']:,.1f} TFLOP/s", flush=True)
    return out


# ---- 2. expert mix alone -------------------------------------------------------------------------

def mix_inputs(shapes: Shapes, device: torch.device, dtype: torch.dtype, tokens: int, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    n, d, e = shapes.side**2, shapes.d, shapes.heads * shapes.top_k
    down = (torch.randn(n, d, generator=g, device=device, dtype=dtype) * d**-0.5).requires_grad_()
    up = (torch.randn(n, d, generator=g, device=device, dtype=dtype) * (d**-0.5 / shapes.heads**0.5)).requires_grad_()
    x = torch.randn(tokens, d, generator=g, device=device, dtype=dtype).requires_grad_()
    ids = torch.randint(0, n, (tokens, e), generator=g, device=device)
    gates = torch.softmax(torch.randn(tokens, shapes.heads, shapes.top_k, generator=g, device=device), -1)
    gates = gates.reshape(tokens, e).to(dtype).requires_grad_()
    return x, ids, gates, down, up


def mix_bytes(tokens: int, slots: int, d: int, rows: int, b_t: int, b_a: int, b_g: int) -> dict:
    """The traffic of the Triton kernels as the top of peer_model/kernels/expert_mix.py counts it."""
    from peer_model.kernels.expert_mix import forward_bytes

    token_backward = tokens * (2 * slots * d * b_t + 2 * d * b_a + slots * (8 + b_g + 4) + slots * (4 + b_g))
    rows_written = 2 * rows * d * b_t
    pair_reads = tokens * 2 * slots * d * b_a  # the row kernel's x[t], grad_out[t] per (token, slot) pair
    return {
        "forward": forward_bytes(tokens, slots, d, b_t, b_a, b_g),
        "backward": token_backward + rows_written,
        "backward_with_pair_reads": token_backward + rows_written + pair_reads,
        "backward_rows_written": rows_written,
        "distinct_rows": rows,
    }


def part_expert_mix(shapes: Shapes, device: torch.device, budget: Budget, copy_gbps: float | None) -> dict:
    from peer_model.kernels import triton_available
    from peer_model.kernels.expert_mix import INTERPRETED, expert_mix_triton

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the CPU torch path computes in fp32
    x, ids, gates, down, up = mix_inputs(shapes, device, dtype, shapes.tokens)
    m, e, d = ids.shape[0], ids.shape[1], shapes.d
    size = torch.tensor([], dtype=dtype).element_size()
    nbytes = mix_bytes(m, e, d, torch.unique(ids).numel(), size, size, size)
    out: dict = {"N": shapes.side**2, "d": d, "heads": shapes.heads, "top_k": shapes.top_k, "slots": e,
                 "tokens": m, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes,
                 "triton_interpreted": INTERPRETED, "triton_available": triton_available(device),
                 "copy_gb_per_s": copy_gbps, "targets": {"forward": 0.85, "backward": 0.60}}
    grad_out = torch.randn(m, d, device=device, dtype=dtype) * 0.1
    paths = {
        "triton": lambda *a: expert_mix_triton(*a, "gelu"),
        "torch": lambda *a: _ExpertMix.apply(*a, "gelu", None),
    }
    for name, fn in paths.items():
        if budget.expired():
            out[name] = {"skipped": "time budget"}
            continue
        # Triton's interpreter (CPU) takes milliseconds a program: one call, no warm-up (its time means nothing)
        iters, warmup = (1, 0) if name == "triton" and INTERPRETED else (shapes.iters, 2)
        try:
            res: dict = {}
            with torch.no_grad():
                fwd = timed(lambda: fn(x, ids, gates, down, up), device, iters, warmup=warmup)
            res["forward"] = stats(fwd)
            result = fn(x, ids, gates, down, up)
            inputs = [x, gates, down, up]
            bwd = timed(lambda: torch.autograd.grad(result, inputs, grad_out, retain_graph=True), device,
                        iters, warmup=warmup)
            res["backward"] = stats(bwd)
            del result
            for phase in ("forward", "backward"):
                gbps = nbytes[phase] / res[phase]["best_s"] / 1e9
                res[phase]["gb_per_s"] = gbps
                res[phase]["gb_per_s_median"] = nbytes[phase] / res[phase]["median_s"] / 1e9
                res[phase]["fraction_of_copy"] = gbps * 1e9 / (copy_gbps * 1e9) if copy_gbps else None
            res["backward"]["gb_per_s_with_pair_reads"] = (nbytes["backward_with_pair_reads"]
                                                          / res["backward"]["best_s"] / 1e9)
            out[name] = res
            frac = {p: res[p]["fraction_of_copy"] for p in ("forward", "backward")}
            print(f"  {name}: forward {res['forward']['best_s'] * 1e3:.3f} ms "
                  f"({res['forward']['gb_per_s']:,.0f} GB/s{_pct(frac['forward'])}), backward "
                  f"{res['backward']['best_s'] * 1e3:.3f} ms ({res['backward']['gb_per_s']:,.0f} GB/s"
                  f"{_pct(frac['backward'])})", flush=True)
        except Exception as exc:  # noqa: BLE001
            out[name] = _error(exc)
        free(device)
    if not budget.expired():
        try:
            out["check"] = check_mix(x, ids, gates, down, up, paths, shapes.check_tokens, device)
        except Exception as exc:  # noqa: BLE001
            out["check"] = _error(exc)
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    del x, ids, gates, down, up, grad_out
    free(device)
    return out


def check_mix(x, ids, gates, down, up, paths, tokens: int, device: torch.device) -> dict:
    """Max abs differences on the first ``tokens`` tokens: each path against expert_mix_reference in fp32
    (on the rows used, gathered and upcast), and Triton against torch; output and every gradient."""
    xs, ids_s, gs = x[:tokens].detach(), ids[:tokens], gates[:tokens].detach()
    used, local = torch.unique(ids_s, return_inverse=True)  # sorted: the order of the sparse rows
    ref_in = [xs.float().requires_grad_(), gs.float().requires_grad_(),
              down.detach()[used].float().requires_grad_(), up.detach()[used].float().requires_grad_()]
    ref = expert_mix_reference(ref_in[0], local, ref_in[1], ref_in[2], ref_in[3], "gelu")
    grad_out = torch.randn(ref.shape, generator=torch.Generator(device=device).manual_seed(1), device=device)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
    scale = {"out": ref.abs().max().item(), "grad_x": ref_grads[0].abs().max().item(),
             "grad_gates": ref_grads[1].abs().max().item(), "grad_down": ref_grads[2].abs().max().item(),
             "grad_up": ref_grads[3].abs().max().item()}
    results: dict = {"tokens": tokens, "reference_max_abs": scale}
    got = {}
    for name, fn in paths.items():
        try:
            inputs = [xs.clone().requires_grad_(), gs.clone().requires_grad_(), down, up]
            out = fn(inputs[0], ids_s, inputs[1], down, up)
            grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
            rows_d, vals_d = sparse_rows(grads[2])
            rows_u, vals_u = sparse_rows(grads[3])
            if not (torch.equal(rows_d, used) and torch.equal(rows_u, used)):
                raise AssertionError("sparse gradient rows differ from the rows used")
            got[name] = {"out": out, "grad_x": grads[0], "grad_gates": grads[1], "grad_down": vals_d,
                         "grad_up": vals_u}
            results[f"{name}_vs_reference"] = {
                "out": max_diff(out, ref), "grad_x": max_diff(grads[0], ref_grads[0]),
                "grad_gates": max_diff(grads[1], ref_grads[1]), "grad_down": max_diff(vals_d, ref_grads[2]),
                "grad_up": max_diff(vals_u, ref_grads[3])}
        except Exception as exc:  # noqa: BLE001
            results[f"{name}_vs_reference"] = _error(exc)
    if len(got) == 2:
        results["triton_vs_torch"] = {k: max_diff(got["triton"][k], got["torch"][k]) for k in got["triton"]}
    worst = {name: max(v.values()) for name, v in results.items()
             if name.endswith("_vs_reference") and "error" not in v}
    print("  check (max abs diff vs fp32 reference, first", tokens, "tokens):",
          ", ".join(f"{k.split('_vs')[0]} {v:.3g}" for k, v in worst.items()),
          f"(output scale {scale['out']:.3g})", flush=True)
    return results


# ---- 3. one PEER layer's training step against peer-pytorch --------------------------------------

def build_layer(impl: str, shapes: Shapes, device: torch.device):
    torch.manual_seed(0)
    n = shapes.side**2
    with torch.device(device):
        if impl == "ours":
            layer = PEER(shapes.d, PEERConfig(num_experts=n, heads=shapes.heads, top_k=shapes.top_k,
                                              d_key=shapes.d_key))
            tables = [layer.expert_down, layer.expert_up]
            dense = [p for p in layer.parameters() if all(p is not t for t in tables)]
            return layer, [torch.optim.AdamW(dense, lr=1e-3), SparseRowAdam(tables, lr=1e-3)]
        from PEER_pytorch import PEER as TheirPEER

        layer = TheirPEER(shapes.d, heads=shapes.heads, num_experts=n, num_experts_per_head=shapes.top_k,
                          dim_key=shapes.d_key // 2, non_competing_scores=False)
        return layer, [torch.optim.AdamW(layer.parameters(), lr=1e-3)]


def layer_step(layer, optimizers, x, target, device: torch.device) -> None:
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        y = layer(x)
    F.mse_loss(y.float(), target).backward()
    for opt in optimizers:
        opt.step()


def part_peer_layer(shapes: Shapes, device: torch.device, budget: Budget) -> dict:
    out: dict = {"N": shapes.side**2, "d": shapes.d, "heads": shapes.heads, "top_k": shapes.top_k,
                 "tokens": shapes.tokens, "precision": "fp32 parameters, bf16 autocast" if device.type == "cuda"
                 else "fp32 (CPU)", "targets": {"speedup": 10.0, "memory_ratio": 0.5}}
    try:
        import PEER_pytorch  # noqa: F401
        out["peer_pytorch_version"] = _version("PEER-pytorch")
        impls = ("ours", "theirs")
    except Exception as exc:  # noqa: BLE001
        out["theirs"] = {"error": f"peer-pytorch not available ({type(exc).__name__}: {exc})"}
        print(f"  peer-pytorch not available: {exc}", flush=True)
        impls = ("ours",)
    for impl in impls:
        if budget.expired():
            out[impl] = {"skipped": "time budget"}
            continue
        try:
            free(device)
            base = reset_peak(device)
            layer, optimizers = build_layer(impl, shapes, device)
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(1, shapes.tokens, shapes.d, generator=g, device=device)
            target = torch.randn(1, shapes.tokens, shapes.d, generator=g, device=device)
            times = timed(lambda: layer_step(layer, optimizers, x, target, device), device, shapes.layer_steps,
                          warmup=shapes.layer_warmup)
            out[impl] = {**stats(times), "peak_gib": peak_growth(device, base),
                         "parameters": sum(p.numel() for p in layer.parameters())}
            print(f"  {impl}: step {out[impl]['median_s'] * 1e3:.1f} ms (median of {len(times)}), peak "
                  f"{_gib(out[impl]['peak_gib'])}", flush=True)
            del layer, optimizers, x, target
        except Exception as exc:  # noqa: BLE001
            out[impl] = _error(exc)
        free(device)
    ours, theirs = out.get("ours", {}), out.get("theirs", {})
    if "median_s" in ours and "median_s" in theirs:
        out["speedup"] = theirs["median_s"] / ours["median_s"]
        if ours.get("peak_gib") is not None and theirs.get("peak_gib"):
            out["memory_ratio"] = ours["peak_gib"] / theirs["peak_gib"]
        print(f"  speed-up {out['speedup']:.2f}× (target ≥ 10×), memory ratio "
              f"{_fmt(out.get('memory_ratio'), '.2f')} (target ≤ 0.5)", flush=True)
    return out


# ---- 4. the gpu-base preset: training and serving ------------------------------------------------

class _NoEOSTokenizer(ByteTokenizer):
    """Bytes, with EOS never sampled: a random model's completions then all run their full length."""

    never_sampled = frozenset({BOS, PAD, EOS})


def build_model(config, device: torch.device) -> PEERTransformer:
    torch.manual_seed(0)
    try:
        with torch.device(device):  # straight on the GPU: no 8 GiB of CPU init and copy
            return PEERTransformer(config)
    except Exception as exc:  # noqa: BLE001
        print(f"  building on {device} failed ({exc!r}); building on CPU and moving", flush=True)
        return PEERTransformer(config).to(device)


def part_gpu_base(shapes: Shapes, device: torch.device, budget: Budget, matmul_tflops: float | None) -> dict:
    config = preset_config("gpu-base", **shapes.model_overrides)
    out: dict = {"config": {k: v for k, v in config.to_dict().items() if k in
                            ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "peer_layers", "peer")}}
    model = build_model(config, device)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    flops = count_flops(config, seq_len=shapes.seq)
    out["train_flops_per_token"] = flops.train_per_token
    try:
        out["train"] = train_gpu_base(model, shapes, device, flops.train_per_token, matmul_tflops)
    except Exception as exc:  # noqa: BLE001
        out["train"] = _error(exc)
    free(device)
    model.eval()
    out["serve_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    out["serve"] = serve_gpu_base(model, shapes, device, budget)
    del model
    free(device)
    return out


def train_gpu_base(model, shapes: Shapes, device: torch.device, flops_per_token: float,
                   matmul_tflops: float | None) -> dict:
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = TrainConfig(steps=shapes.train_steps, batch_size=shapes.batch, seq_len=shapes.seq, device=str(device),
                      param_dtype=dtype, warmup_steps=10, log_every=shapes.train_steps, eval_every=10**9)
    g = torch.Generator().manual_seed(0)
    data = TokenData(torch.randint(0, 256, (max(1 << 20, 4 * shapes.batch * shapes.seq),), generator=g,
                                   dtype=torch.uint8))
    place_model(model, cfg)
    reset_peak(device)  # the peak from here: bf16 weights, optimizer state, activations (not the fp32 build)
    optimizers = build_optimizers(model, cfg)
    warm = train(model, data, None, replace(cfg, steps=shapes.train_warmup, log_every=shapes.train_warmup),
                 optimizers=optimizers)
    sync(device)
    result = train(model, data, None, cfg, optimizers=optimizers)
    sync(device)
    tokens = result.tokens_seen
    tps = tokens / result.elapsed_s
    res = {"param_dtype": dtype, "batch": shapes.batch, "seq_len": shapes.seq, "steps": result.steps_done,
           "warmup_steps": warm.steps_done, "warmup_s": warm.elapsed_s, "elapsed_s": result.elapsed_s,
           "step_s": result.elapsed_s / result.steps_done, "tokens_per_s": tps,
           "loss": result.history[-1]["loss"] if result.history else None,
           "peak_gib": peak_growth(device, 0),
           "mfu": tps * flops_per_token / H200_BF16_PEAK if device.type == "cuda" else None,
           "mfu_peak_flops": H200_BF16_PEAK,
           "fraction_of_measured_matmul": (tps * flops_per_token / (matmul_tflops * 1e12)) if matmul_tflops else None}
    if device.type != "cuda":
        res["note"] = "bf16 parameters need CUDA: the CPU smoke run trains in fp32"
    print(f"  train ({dtype}): {tps:,.0f} tokens/s, {res['step_s'] * 1e3:.1f} ms/step, MFU "
          f"{_pct(res['mfu'], bare=True)} of {H200_BF16_PEAK / 1e12:.0f} TFLOP/s, peak {_gib(res['peak_gib'])}",
          flush=True)
    del optimizers
    return res


def serve_round(decoder: BatchDecoder, prompts: list[list[int]], params: SamplingParams, device) -> dict:
    sync(device)
    start = time.perf_counter()
    for prompt in prompts:
        decoder.add(prompt, params)
    sync(device)
    prefilled = time.perf_counter()
    emitted, steps = 0, 0
    while len(decoder):
        emitted += len(decoder.step())
        steps += 1
    sync(device)
    end = time.perf_counter()
    decoded = len(prompts) * (params.max_tokens - 1)  # tokens computed by batched decode steps
    return {"prefill_s": prefilled - start, "decode_s": end - prefilled, "tokens": emitted, "steps": steps,
            "decode_tokens_per_s": decoded / (end - prefilled), "tokens_per_s": emitted / (end - start)}


def serve_gpu_base(model, shapes: Shapes, device: torch.device, budget: Budget) -> dict:
    out: dict = {"prompt_len": shapes.prompt_len, "gen_tokens": shapes.gen_tokens, "levels": {}}
    has_graphs = "cuda_graphs" in inspect.signature(BatchDecoder).parameters
    if not has_graphs:
        out["cuda_graphs"] = "BatchDecoder has no cuda_graphs option in this tree: graphs not measured"
        print("  note:", out["cuda_graphs"], flush=True)
    original = model.tokenizer
    model.tokenizer = _NoEOSTokenizer()
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=shapes.gen_tokens, temperature=0.0)
    warm_params = SamplingParams(max_tokens=4, temperature=0.0)
    try:
        for conc in shapes.concurrency:
            prompts = torch.randint(32, 127, (conc, shapes.prompt_len), generator=g).tolist()
            level: dict = {}
            for mode in ("eager", "graphs"):
                if mode == "graphs" and not has_graphs:
                    continue
                if budget.expired():
                    level[mode] = {"skipped": "time budget"}
                    continue
                try:
                    kwargs = {"cuda_graphs": True} if mode == "graphs" else {}
                    decoder = BatchDecoder(model, conc, **kwargs)
                    serve_round(decoder, prompts, warm_params, device)  # allocations, kernels, graph capture
                    level[mode] = serve_round(decoder, prompts, params, device)
                    del decoder
                except Exception as exc:  # noqa: BLE001
                    level[mode] = _error(exc)
                free(device)
            e, gr = level.get("eager", {}), level.get("graphs", {})
            if "decode_tokens_per_s" in e and "decode_tokens_per_s" in gr:
                level["graphs_over_eager"] = gr["decode_tokens_per_s"] / e["decode_tokens_per_s"]
            out["levels"][str(conc)] = level
            print(f"  serve ×{conc}: eager {_fmt(e.get('decode_tokens_per_s'), ',.0f')} decode tokens/s, graphs "
                  f"{_fmt(gr.get('decode_tokens_per_s'), ',.0f')} ({_fmt(level.get('graphs_over_eager'), '.2f')}×)"
                  + ("".join(f"; {m}: {level[m]['error']}" for m in ("eager", "graphs")
                             if "error" in level.get(m, {}))), flush=True)
    finally:
        model.tokenizer = original
    return out


# ---- report --------------------------------------------------------------------------------------

def _error(exc: BaseException) -> dict:
    text = f"{type(exc).__name__}: {exc}"
    print(f"  ERROR {text}", flush=True)
    traceback.print_exc()
    return {"error": text, "traceback": traceback.format_exc()[-4000:]}


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _pct(value, bare: bool = False) -> str:
    if value is None:
        return "" if not bare else "–"
    return f"{value:.1%}" if bare else f", {value:.1%} of copy"


def _gib(value) -> str:
    return "– (CPU)" if value is None else f"{value:.2f} GiB"


def _status(part: dict) -> str | None:
    if not isinstance(part, dict):
        return None
    if "skipped" in part:
        return f"skipped ({part['skipped']})"
    if "error" in part:
        return f"error: {part['error'][:120]}"
    return None


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"Device: {env['device_name']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
             f"mode {results['mode']}; {results['elapsed_s']:.0f} s in all.", "",
             "| part | measure | value | target |", "|---|---|---:|---|"]

    def row(part, measure, value, target=""):
        lines.append(f"| {part} | {measure} | {value} | {target} |")

    copy = results.get("copy", {})
    if _status(copy):
        row("1 copy", "device copy", _status(copy))
    elif copy:
        row("1 copy", f"device-to-device copy, {copy['bytes_moved'] / 2 / GiB:.2f} GiB bf16, read + write, best of 10",
            f"{copy['gb_per_s']:,.0f} GB/s")
        mm = copy["matmul"]
        row("1 copy", f"{mm['dtype']} matmul {mm['size']}³, best of 5", f"{mm['tflop_per_s']:,.1f} TFLOP/s")
    mix = results.get("expert_mix", {})
    if _status(mix):
        row("2 expert mix", "all", _status(mix))
    elif mix:
        shape = f"N {mix['N']:,}, d {mix['d']}, {mix['slots']} slots, {mix['tokens']:,} tokens, {mix['dtype']}"
        row("2 expert mix", "shape; bytes fwd / bwd", f"{shape}; {mix['bytes']['forward'] / 1e9:.2f} / "
            f"{mix['bytes']['backward'] / 1e9:.2f} GB ({mix['bytes']['distinct_rows']:,} distinct rows)")
        for name in ("triton", "torch"):
            res = mix.get(name, {})
            if _status(res):
                row("2 expert mix", name, _status(res))
                continue
            for phase, target in (("forward", "≥ 85% of copy"), ("backward", "≥ 60% of copy")):
                p = res[phase]
                frac = "" if p["fraction_of_copy"] is None else f", **{p['fraction_of_copy']:.1%}** of copy"
                row("2 expert mix", f"{name} {phase} (best of {p['n']})",
                    f"{p['best_s'] * 1e3:.3f} ms, {p['gb_per_s']:,.0f} GB/s{frac}",
                    target if name == "triton" else "")
        check = mix.get("check", {})
        for name in ("triton", "torch"):
            c = check.get(f"{name}_vs_reference")
            if c:
                row("2 expert mix", f"{name} vs fp32 reference, max abs diff (out, grad x, gates, u, v)",
                    _status(c) or ", ".join(f"{c[k]:.2g}" for k in ("out", "grad_x", "grad_gates", "grad_down",
                                                                     "grad_up")))
        if check.get("reference_max_abs"):
            s = check["reference_max_abs"]
            row("2 expert mix", "reference max abs (same order)",
                ", ".join(f"{s[k]:.2g}" for k in ("out", "grad_x", "grad_gates", "grad_down", "grad_up")))
    layer = results.get("peer_layer", {})
    if _status(layer):
        row("3 PEER layer", "all", _status(layer))
    elif layer:
        for impl, label in (("ours", "ours"), ("theirs", "peer-pytorch 0.2.2")):
            res = layer.get(impl, {})
            row("3 PEER layer", f"{label} step (median of {res.get('n', '–')}), peak memory",
                _status(res) or f"{res['median_s'] * 1e3:.1f} ms, {_gib(res['peak_gib'])}")
        if "speedup" in layer:
            row("3 PEER layer", "speed-up over peer-pytorch", f"**{layer['speedup']:.2f}×**", "≥ 10×")
        if "memory_ratio" in layer:
            row("3 PEER layer", "memory, ours / peer-pytorch", f"**{layer['memory_ratio']:.2f}**", "≤ 0.5")
    base = results.get("gpu_base", {})
    if _status(base):
        row("4 gpu-base", "all", _status(base))
    elif base:
        tr = base.get("train", {})
        if _status(tr):
            row("4 gpu-base", "training", _status(tr))
        elif tr:
            row("4 gpu-base", f"training, {tr['param_dtype']}, {tr['batch']} × {tr['seq_len']} tokens a step",
                f"{tr['tokens_per_s']:,.0f} tokens/s ({tr['step_s'] * 1e3:.1f} ms/step), peak {_gib(tr['peak_gib'])}")
            if tr.get("mfu") is not None:
                row("4 gpu-base", f"model FLOP utilisation ({base['train_flops_per_token'] / 1e9:.2f} GFLOP/token, "
                    f"{tr['mfu_peak_flops'] / 1e12:.0f} TFLOP/s peak)", f"**{tr['mfu']:.1%}**"
                    + (f" ({tr['fraction_of_measured_matmul']:.1%} of the measured matmul)"
                       if tr.get("fraction_of_measured_matmul") else ""))
        serve = base.get("serve", {})
        for conc, level in serve.get("levels", {}).items():
            cells = []
            for mode in ("eager", "graphs"):
                res = level.get(mode)
                if res is None:
                    continue
                cells.append(f"{mode} " + (_status(res) or f"{res['decode_tokens_per_s']:,.0f}"))
            ratio = level.get("graphs_over_eager")
            row("4 gpu-base", f"serving, {conc} concurrent, decode tokens/s ({serve['gen_tokens']} greedy tokens each)",
                "; ".join(cells) + ("" if ratio is None else f"; graphs/eager **{ratio:.2f}×**"))
    if results.get("kernels_fallback"):
        row("3-4", "note", results["kernels_fallback"])
    return "\n".join(lines)


def _kernel_fallback(results: dict) -> None:
    """Parts 3 and 4 run ``expert_mix``, which dispatches to the Triton kernels on CUDA. When they failed
    in part 2, switch it to the torch path (PEER_KERNELS=torch) so those parts still measure something,
    and say so in the results."""
    from peer_model import experts

    mix = results.get("expert_mix", {})
    if "error" in mix.get("triton", {}) and os.environ.get("PEER_KERNELS") != "torch":
        os.environ["PEER_KERNELS"] = "torch"
        experts._triton_on.cache_clear()
        results["kernels_fallback"] = "the Triton expert mix failed in part 2: parts 3 and 4 ran the torch path"
        print("  NOTE:", results["kernels_fallback"], flush=True)
    results["expert_mix_dispatch"] = "triton" if experts._triton_on(torch.device("cuda")) else "torch"


def environment(device: torch.device) -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "triton_interpret": os.environ.get("TRITON_INTERPRET"), "peer_kernels": os.environ.get("PEER_KERNELS")}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(sms=prop.multi_processor_count, memory_gib=prop.total_memory / GiB,
                   capability=f"{prop.major}.{prop.minor}")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/gpu.json", help="JSON results (rewritten after every part)")
    parser.add_argument("--small", action="store_true", default=not CUDA,
                        help="tiny shapes (the default without CUDA: a smoke test of the script)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="parts that would start later are skipped")
    parser.add_argument("--parts", nargs="+", default=["copy", "expert_mix", "peer_layer", "gpu_base"],
                        choices=["copy", "expert_mix", "peer_layer", "gpu_base"])
    args = parser.parse_args()
    device = torch.device("cuda" if CUDA else "cpu")
    shapes = SMALL if args.small else FULL
    budget = Budget(args.budget_s)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"mode": "small" if args.small else "full", "budget_s": args.budget_s,
                     "environment": environment(device), "shapes": asdict(shapes) | {"model_overrides": str(
                         shapes.model_overrides)}}
    print(f"{results['environment']['device_name']}: torch {torch.__version__}, triton "
          f"{results['environment']['triton']}, mode {results['mode']}, budget {args.budget_s:.0f} s", flush=True)

    def save() -> None:
        results["elapsed_s"] = budget.elapsed()
        out_path.write_text(json.dumps(results, indent=2, default=str))

    parts = {
        "copy": lambda: part_copy(shapes, device, budget),
        "expert_mix": lambda: part_expert_mix(shapes, device, budget, results.get("copy", {}).get("gb_per_s")),
        "peer_layer": lambda: part_peer_layer(shapes, device, budget),
        "gpu_base": lambda: part_gpu_base(shapes, device, budget,
                                          results.get("copy", {}).get("matmul", {}).get("tflop_per_s")),
    }
    for name, fn in parts.items():
        if name not in args.parts:
            continue
        if budget.expired():
            results[name] = {"skipped": f"time budget ({args.budget_s:g} s) spent"}
            print(f"[{name}] skipped: time budget spent", flush=True)
            save()
            continue
        if name in ("peer_layer", "gpu_base") and device.type == "cuda":
            _kernel_fallback(results)
        print(f"[{name}] at {budget.elapsed():.1f} s", flush=True)
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001
            results[name] = _error(exc)
        results[name]["part_s"] = time.perf_counter() - start
        free(device)
        save()
    forbidden = sorted(m for m in sys.modules if m.split(".")[0] in ("service", "fastapi", "celery", "sqlalchemy"))
    results["forbidden_imports"] = forbidden
    save()
    print(f"\nDone in {budget.elapsed():.1f} s; results in {out_path}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
