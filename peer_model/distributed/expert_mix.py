"""The expert mix (peer_model/experts.py) over expert tables split by columns between processes.

Each of R processes holds columns ``[a, b)`` of both tables (d/R of every expert's vector) and routes
its own tokens. One forward, for the tokens of every process at once:

1. the (id, gate) pairs are all-gathered, and the tokens are exchanged by an all-to-all so that each
   process holds every token's columns ``[a, b)``;
2. each process computes partial pre-activations ``u_i[a:b] · x[a:b]`` of every pair; one all-reduce
   sums them into the full ``u_i · x`` (the only step that needs the other columns);
3. each process activates, gates and sums its columns of the up-vectors, ``Σ g σ(u·x) v_i[a:b]``, and an
   all-to-all sends every token's columns back to the process that owns the token.

The backward mirrors it (gradient columns out, one all-reduce of ``v_i · dy`` partial sums, input
gradient columns back). Each process' table gradients are sparse rows of its own columns, computed from
every token of the group: no gradient of an expert table is ever all-reduced. Per token and layer a
process sends about ``(R − 1) (16 d / R + 24 h k)`` bytes in fp32 (docs/scaling.md).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..experts import _activation, _activation_grad, _sparse_rows, gather_dot
from ..rowsum import RowSum
from .shards import ColumnShards


class _ColumnShardedMix(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # no casts (a bf16 table is never copied to fp32): see _in_table_dtype
    def forward(ctx, x, ids, gates, down, up, activation, trainable, shards: ColumnShards):
        with _in_table_dtype(down):
            return _ColumnShardedMix._forward(ctx, x, ids, gates, down, up, activation, trainable, shards)

    @staticmethod
    def _forward(ctx, x, ids, gates, down, up, activation, trainable, shards):
        counts = shards.row_counts(x.shape[0], x.device)
        # ids (< 2**31) and gates travel as one int32 block: one all-gather instead of two
        routes = torch.cat([ids.to(torch.int32), gates.float().view(torch.int32)], dim=1)
        routes = shards.all_gather_rows(routes, counts)
        all_ids = routes[:, : ids.shape[1]].long()
        all_gates = routes[:, ids.shape[1] :].contiguous().view(torch.float32)
        x_cols = shards.scatter_columns(x.to(down.dtype), counts)  # (M_all, d_own)
        # (M_all, E): partial dot products, summed in fp32 whatever the tables' dtype
        pre = shards.all_reduce_(gather_dot(down, all_ids, x_cols).float())
        weights = (all_gates * _activation(pre, activation)).to(up.dtype)
        out_cols = F.embedding_bag(all_ids, up, per_sample_weights=weights, mode="sum")  # (M_all, d_own)
        ctx.save_for_backward(x_cols, all_ids, all_gates, down, up, pre, trainable)
        ctx.activation, ctx.shards, ctx.counts, ctx.width = activation, shards, counts, x.shape[1]
        ctx.gates_dtype = gates.dtype
        return shards.gather_columns(out_cols, counts, x.shape[1])  # (M, d)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        with _in_table_dtype(ctx.saved_tensors[3]):
            return _ColumnShardedMix._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x_cols, all_ids, all_gates, down, up, pre, trainable = ctx.saved_tensors
        shards, counts = ctx.shards, ctx.counts
        start = sum(counts[: shards.rank])
        mine = slice(start, start + counts[shards.rank])
        grad_cols = shards.scatter_columns(grad_out.to(up.dtype).contiguous(), counts)  # (M_all, d_own)
        act = _activation(pre, ctx.activation)
        grad_weights = shards.all_reduce_(gather_dot(up, all_ids, grad_cols).float())  # dL/d(gate * act), (M_all, E)
        grad_pre = _activation_grad(grad_weights * all_gates, pre, ctx.activation).to(down.dtype)
        grad_x = grad_gates = grad_down = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_x_cols = F.embedding_bag(all_ids, down, per_sample_weights=grad_pre, mode="sum")
            grad_x = shards.gather_columns(grad_x_cols, counts, ctx.width)
        if ctx.needs_input_grad[2]:
            grad_gates = (grad_weights * act)[mine].to(ctx.gates_dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            row_sum = RowSum(all_ids)
            if ctx.needs_input_grad[3]:
                grad_down = _sparse_rows(row_sum, grad_pre, x_cols, down.shape[0], trainable)
            if ctx.needs_input_grad[4]:
                grad_up = _sparse_rows(row_sum, (all_gates * act).to(up.dtype), grad_cols, up.shape[0], trainable)
        return grad_x, None, grad_gates, grad_down, grad_up, None, None, None


def _in_table_dtype(table: torch.Tensor):
    """Autocast off on CUDA: the mix computes in the tables' dtype (tokens and gates are cast to it), as the
    Triton kernels do; casting a bf16 table to fp32 would copy it every step."""
    return torch.autocast("cuda", enabled=False) if table.is_cuda else contextlib.nullcontext()


def column_sharded_expert_mix(
    x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
    shards: ColumnShards, activation: str = "gelu", trainable: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`peer_model.experts.expert_mix` with ``down``, ``up``: (N, d_own), this process' columns.

    x: (M, d), ids, gates: (M, E), this process' tokens (M may differ between processes); returns (M, d).
    Every process of ``shards.group`` must call it (and its backward) in the same order.
    """
    return _ColumnShardedMix.apply(x, ids, gates, down, up, activation, trainable, shards)
