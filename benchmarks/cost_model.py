"""The cost model of docs/scaling.md for column-sharded PEER expert tables (peer_model/distributed).

For one PEER layer of N experts of width d, h heads × top-k (E = h·k pairs per token), on R processes
that each hold M tokens a step:

* memory per process: both tables' columns (d/R of each row) in the parameter dtype, the optimizer's
  first moment for them in fp32, and per row (on every process) SparseRowAdam's second moment and step
  count, the usage counter and the trainable mask;
* bytes each process sends per step (as shards.py counts them): per token
  ``(R − 1) · (4 · d · a / R + 8 · E + 4 · E · s)`` — four all-to-alls of the token's columns (input and
  output, forward and backward; ``a`` bytes a value), the all-gather of its ids and gates (8 bytes a pair),
  two all-reduces of partial dot products over all R · M tokens (``s`` bytes a value) — plus, per step,
  the optimizer's all-reduce of one number per used row and table;
* time: the larger of the bytes sent over the link's bandwidth and the expert mix's memory traffic
  over the memory bandwidth (the selected rows read forward and backward, the used rows' optimizer
  update), i.e. tokens/s per process = M / max(network time, memory time).

    python benchmarks/cost_model.py                                # the tables of docs/scaling.md
    python benchmarks/cost_model.py --check runs/sharded-d512.json # the model against benchmarks/sharded.py
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class Layer:
    experts: int
    d: int
    pairs: int = 8 * 16  # E = heads × top-k
    param_bytes: int = 2  # bf16 tables (TrainConfig.param_dtype on GPU)
    activation_bytes: int = 2  # the token columns exchanged (bf16)
    sum_bytes: int = 4  # partial dot products all-reduced in fp32


def memory_per_process(layer: Layer, processes: int) -> float:
    """Bytes of one PEER layer's expert state on each process."""
    columns = layer.d / processes
    tables = 2 * layer.experts * columns * (layer.param_bytes + 4)  # parameters + fp32 first moment
    per_row = layer.experts * (2 * (4 + 4) + 8 + 1)  # per table: exp_avg_sq, step; usage counter, trainable
    return tables + per_row


def used_rows(layer: Layer, pairs_per_step: float) -> float:
    """Expected distinct experts among ``pairs_per_step`` selections spread uniformly over the pool."""
    return layer.experts * -math.expm1(-pairs_per_step / layer.experts)


def mix_bytes_per_token(layer: Layer, processes: int) -> float:
    """Bytes a process sends per token of its own in the expert mix (forward and backward)."""
    r = processes
    return (r - 1) * (4 * layer.d * layer.activation_bytes / r + 8 * layer.pairs + 4 * layer.pairs * layer.sum_bytes)


def bytes_sent_per_step(layer: Layer, processes: int, tokens: int) -> float:
    """Bytes each process sends per training step of one layer (its ``tokens`` tokens): the expert mix,
    and the optimizer's all-reduce of one number per used row and table."""
    r = processes
    if r == 1:
        return 0.0
    optimizer = 2 * used_rows(layer, r * tokens * layer.pairs) * 4 * 2 * (r - 1) / r
    return tokens * mix_bytes_per_token(layer, r) + optimizer


def row_wise_bytes_per_token(layer: Layer, processes: int) -> float:
    """The row-wise alternative (expert i on process i mod R, benchmarks/sharded.py's prototype, without its
    padding): each token goes to every other process owning one of its experts (expected
    ``(R − 1)(1 − (1 − 1/R)^E)`` of them) and comes back, forward and backward (4 vectors of d), with its
    pairs' ids and gates out and the gates' gradient back (12 bytes a pair sent away)."""
    r = processes
    others = (r - 1) * (1 - (1 - 1 / r) ** layer.pairs)
    return 4 * others * layer.d * layer.activation_bytes + 12 * layer.pairs * (r - 1) / r


def memory_traffic_per_step(layer: Layer, processes: int, tokens: int) -> float:
    """Bytes each process reads or writes in its memory per step for one layer (a lower bound): the selected
    rows' columns of both tables, forward and backward, for every process' tokens, and the used rows'
    optimizer update (parameter, first moment and gradient read, parameter and moment written)."""
    columns = layer.d / processes
    rows_read = 4 * processes * tokens * layer.pairs * columns * layer.param_bytes
    update = 2 * used_rows(layer, processes * tokens * layer.pairs) * columns * (2 * layer.param_bytes + 3 * 4)
    return rows_read + update


def tokens_per_s(layer: Layer, processes: int, tokens: int, link_gb_s: float, memory_gb_s: float) -> dict:
    network = bytes_sent_per_step(layer, processes, tokens) / (link_gb_s * GB) if processes > 1 else 0.0
    memory = memory_traffic_per_step(layer, processes, tokens) / (memory_gb_s * GB)
    return {"network_s": network, "memory_s": memory, "tokens_per_s": tokens / max(network, memory)}


def deployment_table(tokens: int, memory_gb_s: float, links: dict[int, float], gpu_memory_gb: float) -> str:
    lines = ["| pool | d | GPUs | expert state per GPU | fits | sent per step per GPU | network | memory "
             "| bound | tokens/s per GPU | tokens/s, all GPUs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for side in (1024, 4096):
        for d in (1024, 2048, 4096):
            layer = Layer(side * side, d)
            for gpus, link in links.items():
                mem = memory_per_process(layer, gpus) / GB
                sent = bytes_sent_per_step(layer, gpus, tokens) / GB
                t = tokens_per_s(layer, gpus, tokens, link, memory_gb_s)
                bound = "network" if t["network_s"] > t["memory_s"] else "memory"
                lines.append(f"| {side}² | {d} | {gpus} | {mem:.1f} GB | {'yes' if mem < gpu_memory_gb else 'no'} "
                             f"| {sent:.2f} GB | {1e3 * t['network_s']:.0f} ms | {1e3 * t['memory_s']:.0f} ms "
                             f"| {bound} "
                             f"| {t['tokens_per_s'] / 1e6:.2f} M | {gpus * t['tokens_per_s'] / 1e6:.1f} M |")
    return "\n".join(lines)


def layout_table() -> str:
    """Bytes a process sends per token and layer in the expert mix, columns against rows (bf16 activations,
    fp32 sums; the optimizer's per-row all-reduce, columns only, is per step, not per token)."""
    lines = ["| d | processes | columns | rows | rows / columns |", "|---|---|---|---|---|"]
    for d in (256, 1024, 4096):
        layer = Layer(1024 * 1024, d)
        for r in (2, 8, 64):
            columns = mix_bytes_per_token(layer, r)
            rows = row_wise_bytes_per_token(layer, r)
            lines.append(f"| {d} | {r} | {columns / 1e3:.1f} kB | {rows / 1e3:.1f} kB | {rows / columns:.2f} |")
    return "\n".join(lines)


def hybrid_table(tokens: int, memory_gb_s: float, nvlink_gb_s: float, network_gb_s: float, nodes: int = 8,
                 per_node: int = 8) -> str:
    """64 GPUs as ``nodes`` × ``per_node``: the columns split within a node, the node's shards replicated
    across nodes, whose sparse table gradients (the used rows' columns, fp32) are all-reduced between
    the replicas every step (the replica part of issue 17, not built yet)."""
    lines = ["| pool | d | sent per step per GPU: in the node | across nodes | network | memory | bound "
             "| tokens/s per GPU | tokens/s, 64 GPUs |", "|---|---|---|---|---|---|---|---|---|"]
    for side in (1024, 4096):
        for d in (1024, 2048, 4096):
            layer = Layer(side * side, d)
            inside = bytes_sent_per_step(layer, per_node, tokens)
            rows = used_rows(layer, per_node * tokens * layer.pairs)
            across = 2 * rows * (d / per_node) * 4 * 2 * (nodes - 1) / nodes
            network = inside / (nvlink_gb_s * GB) + across / (network_gb_s * GB)
            memory = memory_traffic_per_step(layer, per_node, tokens) / (memory_gb_s * GB)
            rate = tokens / max(network, memory)
            lines.append(f"| {side}² | {d} | {inside / GB:.2f} GB | {across / GB:.2f} GB | {1e3 * network:.0f} ms "
                         f"| {1e3 * memory:.0f} ms | {'network' if network > memory else 'memory'} "
                         f"| {rate / 1e6:.2f} M | {nodes * per_node * rate / 1e6:.1f} M |")
    return "\n".join(lines)


def check(path: Path) -> str:
    """The model's bytes and network-only step time against a benchmarks/sharded.py run (fp32, gloo)."""
    run = json.loads(path.read_text())
    args = run["args"]
    layer = Layer(args["side"] ** 2, args["d"], args["heads"] * args["top_k"], 4, 4, 4)
    bandwidth = {r["processes"]: r for r in run["results"] if r["scheme"] == "bandwidth"}
    lines = ["| processes | MiB sent per step, model | measured | network time, model (measured rates) "
             "| step, columns: median / best | CPU per step, columns (all processes) | unsharded: step median / best "
             "| unsharded: CPU per step |", "|---|---|---|---|---|---|---|---|"]
    unsharded = {r["tokens"]: r for r in run["results"] if r["scheme"] == "unsharded"}
    for result in run["results"]:
        if result["scheme"] != "columns":
            continue
        r, m = result["processes"], args["tokens"]
        model = bytes_sent_per_step(layer, r, m)
        # the activations travel by all-to-all, the rest (routes, partial sums, optimizer) by all-gather/all-reduce
        activations = m * (r - 1) * 4 * layer.d * 4 / r
        rates = bandwidth[r]
        seconds = (activations / (rates["all_to_all_gb_s"] * GB)
                   + (model - activations) / (rates["all_reduce_gb_s"] * GB))
        one = unsharded[result["tokens"]]
        lines.append(f"| {r} | {model / 2**20:.2f} | {result['mib_sent_per_step']:.2f} | {1e3 * seconds:.0f} ms "
                     f"| {result['step_ms']:.0f} / {result['best_step_ms']:.0f} ms "
                     f"| {result['cpu_ms_per_step']:.0f} ms "
                     f"| {one['step_ms']:.0f} / {one['best_step_ms']:.0f} ms | {one['cpu_ms_per_step']:.0f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per GPU per step")
    parser.add_argument("--memory-gb-s", type=float, default=3840.0,
                        help="memory bandwidth per GPU (default: 80%% of an H200's 4.8 TB/s)")
    parser.add_argument("--nvlink-gb-s", type=float, default=360.0,
                        help="per GPU within a node (default: 80%% of NVLink 4's 450 GB/s each way)")
    parser.add_argument("--network-gb-s", type=float, default=40.0,
                        help="per GPU across nodes (default: 80%% of one 400 Gb/s NIC per GPU)")
    parser.add_argument("--gpu-memory-gb", type=float, default=141.0)
    parser.add_argument("--check", type=Path, help="a benchmarks/sharded.py result to compare the model with")
    args = parser.parse_args()
    if args.check:
        print(check(args.check))
        return
    print(layout_table())
    print()
    links = {1: args.nvlink_gb_s, 8: args.nvlink_gb_s, 64: args.network_gb_s}
    print(deployment_table(args.tokens, args.memory_gb_s, links, args.gpu_memory_gb))
    print()
    print(hybrid_table(args.tokens, args.memory_gb_s, args.nvlink_gb_s, args.network_gb_s))


if __name__ == "__main__":
    main()
