"""Sharded expert tables on gloo: column-wise (peer_model/distributed) against a row-wise prototype and the
unsharded layer. BENCHMARKS.md section 9.

One PEER layer (d, pool side², h heads × top-k) trains a step: forward, backward, the routers' gradients
all-reduced, SparseRowAdam on the expert tables. R processes each hold M tokens; the unsharded layer runs
the same global batch (R · M tokens) in one process. Every process runs one thread.

* columns: peer_model.distributed (every process holds d/R of every expert's vector; partial dot
  products all-reduced, token columns exchanged by all-to-all);
* rows: a prototype kept here (not in the library, since it lost): expert i lives on process i mod R
  with its whole vectors; every token is sent once to each process that owns one of its experts, with
  the ids and gates of those experts (padded to the most any token sends to one process, pads repeating
  the token's first id at gate 0), the owner mixes them (the library's sparse-gradient expert mix) and
  sends the partial sums back; autograd reverses the all-to-alls.

Reported per scheme: the median and the best step time (each step timed by its slowest process; on a
shared machine the best is the least disturbed), the CPU time a step costs all processes together (the
cost of the work, whatever else the machine runs; waiting for a collective costs none), the bytes each process sends per
step in the expert mix (counted at every collective as ring/all-to-all algorithms send them; the routers'
gradient all-reduce, the same for both schemes, is not included) and, as a check, the largest difference
of the first step's output from the unsharded layer's. The collectives' throughput on this machine is
measured too (all-reduce and all-to-all of 16 MiB), for docs/scaling.md.

    python benchmarks/sharded.py                               # d 512, 256² experts, h 8, k 16, M 256, R 2 and 4
    python benchmarks/sharded.py --sizes 2 --d 256 --tokens 128 --steps 5
    python benchmarks/sharded.py --table runs/sharded-d*.json  # the markdown table of BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from peer_model.config import PEERConfig
from peer_model.distributed import ColumnShards, Traffic, shard_peer_layers
from peer_model.experts import expert_mix
from peer_model.optim import SparseRowAdam
from peer_model.peer import PEER

TABLES = ("expert_down", "expert_up")


# ---- the row-wise prototype -----------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` to the processes (``send[q]`` rows to q, in order); the backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, send, receive, traffic, rank):
        ctx.send, ctx.receive, ctx.traffic, ctx.rank = send, receive, traffic, rank
        return _exchange(x, send, receive, traffic, rank)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad.contiguous(), ctx.receive, ctx.send, ctx.traffic, ctx.rank), None, None, None, None


def _exchange(x, send, receive, traffic, rank):
    out = x.new_empty(sum(receive), *x.shape[1:])
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    traffic.add((sum(send) - send[rank]) * row)
    dist.all_to_all_single(out, x.contiguous(), receive, send)
    return out


class RowShardedPEER(PEER):
    """Prototype: expert i on process i mod R (local row i // R), whole vectors."""

    def shard_rows(self, rank: int, size: int) -> None:
        self.rank, self.size, self.traffic = rank, size, Traffic()
        for name in TABLES:
            setattr(self, name, torch.nn.Parameter(getattr(self, name).detach()[rank::size].clone()))

    def mix(self, x, ids, gates):
        m, e = ids.shape
        size, rank, traffic = self.size, self.rank, self.traffic
        owner, local = ids % size, ids // size
        key = (owner * m + torch.arange(m).unsqueeze(1)).reshape(-1)  # (owner, token) of every pair
        counts = torch.bincount(key, minlength=size * m)
        width = torch.tensor([int(counts.max())])
        dist.all_reduce(width, dist.ReduceOp.MAX)  # every (owner, token) row is this wide everywhere
        traffic.add(2 * (size - 1) * width.element_size() // size)
        width = int(width)
        order = torch.argsort(key, stable=True)
        sorted_key = key[order]
        slot = torch.arange(m * e) - (torch.cumsum(counts, 0) - counts)[sorted_key]
        row_ids = torch.zeros(size * m, width, dtype=torch.long)
        row_ids[sorted_key, slot] = local.reshape(-1)[order]
        row_ids = torch.where(torch.arange(width) < counts.unsqueeze(1), row_ids, row_ids[:, :1])
        row_gates = gates.new_zeros(size * m, width).index_put((sorted_key, slot), gates.reshape(-1)[order])
        rows = (counts > 0).nonzero().squeeze(1)  # (owner, token) rows to send, by owner then token
        send_counts = (counts > 0).view(size, m).sum(1)
        receive_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(receive_counts, send_counts)
        traffic.add((size - 1) * send_counts.element_size())
        send, receive = send_counts.tolist(), receive_counts.tolist()
        tokens = rows % m
        x_in = _AllToAll.apply(x[tokens], send, receive, traffic, rank)
        ids_in = _exchange(row_ids[rows], send, receive, traffic, rank)
        gates_in = _AllToAll.apply(row_gates[rows], send, receive, traffic, rank)
        partial = expert_mix(x_in, ids_in, gates_in, self.expert_down, self.expert_up, self.config.activation)
        back = _AllToAll.apply(partial, receive, send, traffic, rank)
        return x.new_zeros(m, x.shape[1]).index_add(0, tokens, back)


# ---- one training step ----------------------------------------------------------------------------


def build(args) -> PEER:
    torch.manual_seed(0)
    return PEER(args.d, PEERConfig(num_experts=args.side**2, heads=args.heads, top_k=args.top_k, d_key=128))


def batches(args, size: int, steps: int):
    """Inputs that need their gradient, as a layer inside a model does (its input gradient is exchanged too)."""
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(args.tokens, args.d, generator=generator).requires_grad_() for _ in range(size)]
            for _ in range(steps)]


def train_step(layer, optimizer, x, reduce_routers=None) -> torch.Tensor:
    """Forward, backward, the routers' gradients reduced, the tables' step; returns the output."""
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.pow(2).mean().backward()
    if reduce_routers is not None:
        reduce_routers()
    optimizer.step()
    return out.detach()


def unsharded(args, size: int) -> dict:
    """One process, the global batch of ``size`` processes."""
    torch.set_num_threads(1)
    layer = build(args)
    optimizer = SparseRowAdam([getattr(layer, t) for t in TABLES], lr=1e-3)
    data = batches(args, size, args.steps + 1)
    with torch.no_grad():  # each process' BatchNorm sees its own tokens: so does this reference
        first = torch.cat([copy.deepcopy(layer)(x) for x in data[0]])
    times, cpu = [], 0.0
    for step, xs in enumerate(data):
        start, start_cpu = time.perf_counter(), time.process_time()
        train_step(layer, optimizer, torch.cat([x.detach() for x in xs]).requires_grad_())
        if step:
            times.append(time.perf_counter() - start)
            cpu += time.process_time() - start_cpu
    return {"scheme": "unsharded", "processes": 1, "tokens": size * args.tokens, **_times(times),
            "cpu_ms_per_step": 1e3 * cpu / args.steps, "first_out": first}


def _worker(rank, size, store, args, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=300))
    results = [_bandwidth(rank, size)]
    data = batches(args, size, args.steps + 1)
    for scheme in ("columns", "rows"):
        layer = build(args)
        if scheme == "columns":
            shards = ColumnShards()
            shard_peer_layers(layer, shards)
            traffic = shards.traffic
        else:
            layer.__class__ = RowShardedPEER
            layer.shard_rows(rank, size)
            traffic = layer.traffic
        routers = [p for name, p in layer.named_parameters() if name not in TABLES]

        def reduce_routers():
            for param in routers:
                dist.all_reduce(param.grad)

        optimizer = SparseRowAdam([getattr(layer, t) for t in TABLES], lr=1e-3)
        times, sent, cpu = [], 0, 0.0
        for step, xs in enumerate(data):
            dist.barrier()
            before, start, start_cpu = traffic.bytes_sent, time.perf_counter(), time.process_time()
            out = train_step(layer, optimizer, xs[rank], reduce_routers)
            elapsed = torch.tensor([time.perf_counter() - start])
            cpu += time.process_time() - start_cpu if step else 0.0
            dist.all_reduce(elapsed, dist.ReduceOp.MAX)
            if step:
                times.append(float(elapsed))
                sent += traffic.bytes_sent - before
            else:
                outs = [torch.empty_like(out) for _ in range(size)]
                dist.all_gather(outs, out)
                first = torch.cat(outs)
        total = torch.tensor([float(sent), cpu])
        dist.all_reduce(total)
        results.append({"scheme": scheme, "processes": size, "tokens": size * args.tokens, **_times(times),
                        "cpu_ms_per_step": 1e3 * float(total[1]) / args.steps,
                        "mib_sent_per_step": float(total[0]) / size / args.steps / 2**20, "first_out": first})
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


def _times(seconds: list[float]) -> dict:
    return {"step_ms": 1e3 * statistics.median(seconds), "best_step_ms": 1e3 * min(seconds)}


def _bandwidth(rank: int, size: int, mib: int = 16, repeats: int = 5) -> dict:
    """GB/s each process sends in an all-reduce and an all-to-all of ``mib`` MiB (counted as in shards.py)."""
    x = torch.randn(mib * 2**20 // 4)
    rates = {}
    for name, sent, run in (
        ("all_reduce", 2 * (size - 1) / size * x.numel() * 4, lambda: dist.all_reduce(x)),
        ("all_to_all", (size - 1) / size * x.numel() * 4, lambda: dist.all_to_all_single(torch.empty_like(x), x)),
    ):
        run()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        dist.barrier()
        rates[name + "_gb_s"] = sent * repeats / (time.perf_counter() - start) / 1e9
    return {"scheme": "bandwidth", "processes": size, **rates}


def table(paths: list[str]) -> str:
    lines = ["| d | processes | layout | MiB sent per step and process | step: median / best | CPU per step, all "
             "processes | max \\|diff\\| vs unsharded |", "|---|---|---|---|---|---|---|"]
    for path in paths:
        run = json.loads(Path(path).read_text())
        for r in run["results"]:
            if r["scheme"] == "bandwidth":
                continue
            sent = f"{r['mib_sent_per_step']:.2f}" if "mib_sent_per_step" in r else "–"
            diff = f"{r['max_diff_vs_unsharded']:.0e}" if r["scheme"] != "unsharded" else "–"
            lines.append(f"| {run['args']['d']} | {r['processes']} | {r['scheme']} ({r['tokens']} tokens) | {sent} "
                         f"| {r['step_ms']:.0f} / {r['best_step_ms']:.0f} ms | {r['cpu_ms_per_step']:.0f} ms "
                         f"| {diff} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--side", type=int, default=256, help="pool of side² experts")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="per process")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after one warm-up step")
    parser.add_argument("--out", default="runs/sharded.json")
    parser.add_argument("--table", nargs="+", help="print the markdown table of these result files and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    rows = []
    for size in args.sizes:
        reference = unsharded(args, size)
        with tempfile.TemporaryDirectory() as tmp:
            out_file = Path(tmp) / "results.pt"
            mp.start_processes(_worker, args=(size, str(Path(tmp) / "store"), args, str(out_file)), nprocs=size,
                               start_method="spawn")
            results = torch.load(out_file)
        expected = reference.pop("first_out")
        for result in [reference] + results:
            if "first_out" in result:
                result["max_diff_vs_unsharded"] = float((result.pop("first_out") - expected).abs().max())
            rows.append(result)
            print(json.dumps(result), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
