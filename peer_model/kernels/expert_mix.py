"""PEER's expert mix in Triton: ``out[t] = Σ_e gates[t,e] · σ(u[ids[t,e]] · x[t]) · v[ids[t,e]]``.

The same op, signature and gradient types as ``peer_model.experts.expert_mix`` (x, gates: dense grads;
the tables u = ``down`` and v = ``up``: sparse COO grads holding only the trainable rows used, coalesced),
which is its reference together with ``expert_mix_reference``. Shapes: x (M, d); ids, gates (M, E) with
E = heads · k (ids may repeat within a row); down, up (N, d). Every kernel accumulates in fp32.

Kernels
* ``_token_kernel``, one program per block of BLOCK_M tokens, loops over the E selected experts. Forward:
  pre = u[id] · x, w = gate · σ(pre), out += w · v[id]. Backward (the same loop with the tables swapped):
  g = v[id] · grad_out, grad_gates = g · σ(pre), grad_pre = g · gate · σ'(pre), grad_x += grad_pre · u[id].
  Gathered rows are never materialised. When d fits one BLOCK_D tile (d ≤ 4096 by default) each expert
  row is read once in a single pass; a larger d is tiled and runs as two launches, first the dots
  (all d tiles) and weights, then the weighted row sums (d tiles outer), because σ needs the whole dot
  before any output column can be summed.
* ``_rows_kernel``, the table gradients, without atomics: the (token, slot) pairs are sorted by expert
  id (torch.sort + unique_consecutive around the kernel), and one program per (distinct trainable row,
  d tile) sums that row's pairs, BLOCK_P at a time: grad_u[r] = Σ grad_pre · x[t],
  grad_v[r] = Σ gate · σ(pre) · grad_out[t]. It writes only the used rows (R, d); programs take rows
  heaviest first so a hot expert does not finish last (as Meta's memory layers' reverse-index backward).

Memory traffic (what a benchmark divides by time for the achieved bandwidth), per token, with b_t the
tables' bytes per element and b_a that of x / grad_out:
* forward: E rows of u and E rows of v, 2·E·d·b_t (dominant), + x and out 2·d·b_a, + ids, gates and
  pre E·(8 + b_gate + 4);
* backward, token kernel: the same 2·E·d·b_t + 2·d·b_a (grad_out, grad_x) + E·(8 + b_gate + 4) read,
  E·(4 + b_gate) written (grad_pre, grad_gates);
  row kernel: per (token, slot) pair, the rows x[t] and grad_out[t], 2·E·d·b_a per token (from L2 when
  the batch is hot there), + the sparse values written, 2·R·d·b_t in all.
``forward_bytes`` computes the forward count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a Triton whose interpreter lives elsewhere: the environment decides, as triton.jit does
    InterpretedFunction = None

ACTIVATIONS = ("gelu", "relu")
_MAX_FUSED_D = 4096  # d up to this runs as one tile (one pass); above it, tiles of _TILE_D in two passes
_TILE_D = 1024


# ---- kernels -----------------------------------------------------------------------------------

@triton.jit
def _act(pre, ACTIVATION: tl.constexpr):
    if ACTIVATION == "gelu":  # exact: x · Φ(x)
        return 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))
    else:
        return tl.maximum(pre, 0.0)


@triton.jit
def _act_grad(pre, ACTIVATION: tl.constexpr):
    if ACTIVATION == "gelu":  # Φ(x) + x · φ(x)
        return 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476)) + pre * 0.3989422804014327 * tl.exp(
            -0.5 * pre * pre)
    else:
        return tl.where(pre > 0.0, 1.0, 0.0)


@triton.jit
def _slot_weights(dot, slot, mask, gates_ptr, pre_ptr, weights_ptr, grad_gates_ptr,
                  ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr, STORE_WEIGHTS: tl.constexpr):
    """From the dot of slot ``e`` (BLOCK_M,) to the weight of its row in the sum; stores what is kept."""
    gate = tl.load(gates_ptr + slot, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # dot = dL/d(gate · σ(pre))
        pre = tl.load(pre_ptr + slot, mask=mask, other=0.0)
        grad_gate = dot * _act(pre, ACTIVATION)
        tl.store(grad_gates_ptr + slot, grad_gate.to(grad_gates_ptr.dtype.element_ty), mask=mask)
        weight = dot * gate * _act_grad(pre, ACTIVATION)  # grad_pre
    else:  # dot = pre
        tl.store(pre_ptr + slot, dot, mask=mask)
        weight = gate * _act(dot, ACTIVATION)
    if STORE_WEIGHTS:
        tl.store(weights_ptr + slot, weight, mask=mask)
    return weight


@triton.jit
def _token_kernel(
    vec_ptr,         # (M, D): x (forward) or grad_out (backward)
    ids_ptr,         # (M, E)
    gates_ptr,       # (M, E)
    pre_ptr,         # (M, E) fp32: written by the forward, read by the backward
    dot_table_ptr,   # (N, D): u (forward) or v (backward)
    sum_table_ptr,   # (N, D): v (forward) or u (backward)
    weights_ptr,     # (M, E) fp32: the weights of the sum, gate · σ(pre) or grad_pre
    grad_gates_ptr,  # (M, E): backward only
    out_ptr,         # (M, D): out (forward) or grad_x (backward)
    M, D, E, stride_vec, stride_dot, stride_sum, stride_out,
    ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr,
    DOT: tl.constexpr, SUM: tl.constexpr, STORE_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    token_mask = tokens < M
    tokens = tokens.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    if DOT and SUM:  # d fits one tile: each expert row is read once, nothing round-trips
        mask = token_mask[:, None] & (cols < D)[None, :]
        vec = tl.load(vec_ptr + tokens[:, None] * stride_vec + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for e in range(E):
            slot = tokens * E + e
            rows = tl.load(ids_ptr + slot, mask=token_mask, other=0).to(tl.int64)
            a = tl.load(dot_table_ptr + rows[:, None] * stride_dot + cols[None, :], mask=mask, other=0.0)
            dot = tl.sum(a.to(tl.float32) * vec, axis=1)  # (BLOCK_M,)
            weight = _slot_weights(dot, slot, token_mask, gates_ptr, pre_ptr, weights_ptr, grad_gates_ptr,
                                   ACTIVATION, BACKWARD, STORE_WEIGHTS)
            b = tl.load(sum_table_ptr + rows[:, None] * stride_sum + cols[None, :], mask=mask, other=0.0)
            acc += weight[:, None] * b.to(tl.float32)
        tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif DOT:  # pass 1 of a tiled d: the dots over all tiles, then the weights
        for e in range(E):
            slot = tokens * E + e
            rows = tl.load(ids_ptr + slot, mask=token_mask, other=0).to(tl.int64)
            dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                c = d0 + cols
                mask = token_mask[:, None] & (c < D)[None, :]
                vec = tl.load(vec_ptr + tokens[:, None] * stride_vec + c[None, :], mask=mask, other=0.0)
                a = tl.load(dot_table_ptr + rows[:, None] * stride_dot + c[None, :], mask=mask, other=0.0)
                dot += tl.sum(a.to(tl.float32) * vec.to(tl.float32), axis=1)
            _slot_weights(dot, slot, token_mask, gates_ptr, pre_ptr, weights_ptr, grad_gates_ptr,
                          ACTIVATION, BACKWARD, STORE_WEIGHTS)
    else:  # pass 2 of a tiled d: out[:, tile] = Σ_e weight · sum_table[id, tile]
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            mask = token_mask[:, None] & (c < D)[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for e in range(E):
                slot = tokens * E + e
                rows = tl.load(ids_ptr + slot, mask=token_mask, other=0).to(tl.int64)
                weight = tl.load(weights_ptr + slot, mask=token_mask, other=0.0)
                b = tl.load(sum_table_ptr + rows[:, None] * stride_sum + c[None, :], mask=mask, other=0.0)
                acc += weight[:, None] * b.to(tl.float32)
            tl.store(out_ptr + tokens[:, None] * stride_out + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_kernel(
    schedule_ptr,    # (R,): the row each program takes, heaviest first
    starts_ptr,      # (R,): row r's pairs are order[starts[r]:ends[r]]
    ends_ptr,        # (R,)
    order_ptr,       # (M·E,): flat (token, slot) pair indices t·E + e, sorted by expert id
    x_ptr,           # (M, D)
    grad_out_ptr,    # (M, D)
    grad_pre_ptr,    # (M, E) fp32
    gates_ptr,       # (M, E)
    pre_ptr,         # (M, E) fp32
    grad_down_ptr,   # (R, D) out: values of grad u
    grad_up_ptr,     # (R, D) out: values of grad v
    D, E, stride_x, stride_grad_out,
    ACTIVATION: tl.constexpr, DOWN: tl.constexpr, UP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.load(schedule_ptr + tl.program_id(0)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    start = tl.load(starts_ptr + r)
    end = tl.load(ends_ptr + r)
    acc_down = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pair_mask = p < end
        pair = tl.load(order_ptr + p, mask=pair_mask, other=0).to(tl.int64)
        tokens = pair // E
        mask = pair_mask[:, None] & col_mask[None, :]
        if DOWN:  # grad_u[r] += grad_pre · x[t]
            grad_pre = tl.load(grad_pre_ptr + pair, mask=pair_mask, other=0.0)
            xs = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            acc_down += tl.sum(grad_pre[:, None] * xs.to(tl.float32), axis=0)
        if UP:  # grad_v[r] += gate · σ(pre) · grad_out[t]
            gate = tl.load(gates_ptr + pair, mask=pair_mask, other=0.0).to(tl.float32)
            pre = tl.load(pre_ptr + pair, mask=pair_mask, other=0.0)
            weight = gate * _act(pre, ACTIVATION)
            gs = tl.load(grad_out_ptr + tokens[:, None] * stride_grad_out + cols[None, :], mask=mask, other=0.0)
            acc_up += tl.sum(weight[:, None] * gs.to(tl.float32), axis=0)
    if DOWN:
        tl.store(grad_down_ptr + r * D + cols, acc_down.to(grad_down_ptr.dtype.element_ty), mask=col_mask)
    if UP:
        tl.store(grad_up_ptr + r * D + cols, acc_up.to(grad_up_ptr.dtype.element_ty), mask=col_mask)


INTERPRETED = (isinstance(_token_kernel, InterpretedFunction) if InterpretedFunction is not None
               else os.environ.get("TRITON_INTERPRET") == "1")  # built for TRITON_INTERPRET=1 (CPU)


# ---- launch --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Blocks:
    """Tile sizes. ``dim``: BLOCK_D of the token kernel (d ≤ dim runs in one pass); ``tokens``: its
    BLOCK_M; ``pairs`` and ``row_dim``: BLOCK_P and BLOCK_D of the row kernel. Untuned guesses by
    default (``for_dim``): measure on the GPU."""

    tokens: int
    dim: int
    pairs: int = 16
    row_dim: int = 256

    @classmethod
    def for_dim(cls, d: int) -> "Blocks":
        dim = triton.next_power_of_2(d)
        dim = dim if dim <= _MAX_FUSED_D else _TILE_D
        return cls(tokens=max(1, min(16, 4096 // dim)), dim=dim, pairs=16,
                   row_dim=min(triton.next_power_of_2(d), 256))


def _num_warps(elements: int) -> int:
    """Warps for a program whose tiles hold ``elements`` values (≈ 16-64 fp32 per thread and tile)."""
    return max(1, min(8, elements // 512))


def _token_pass(vec, ids, gates, pre, dot_table, sum_table, weights, grad_gates, out, activation: str,
                backward: bool, blocks: Blocks, need_sum: bool = True) -> None:
    tokens, slots = ids.shape
    d = vec.shape[1]
    fused = d <= blocks.dim
    # (DOT, SUM) phases: one fused pass, or the dots then the sums
    phases = [(True, need_sum)] if fused else [(True, False)] + ([(False, True)] if need_sum else [])
    grid = (triton.cdiv(tokens, blocks.tokens),)
    for dot, add in phases:
        _token_kernel[grid](
            vec, ids, gates, pre, dot_table, sum_table, weights, grad_gates, out,
            tokens, d, slots, vec.stride(0), dot_table.stride(0), sum_table.stride(0), out.stride(0),
            ACTIVATION=activation, BACKWARD=backward, DOT=dot, SUM=add,
            STORE_WEIGHTS=backward or not (dot and add),
            BLOCK_M=blocks.tokens, BLOCK_D=blocks.dim, num_warps=_num_warps(blocks.tokens * blocks.dim),
        )


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with unit stride along its last dimension (a table already so is not copied)."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _sparse(rows: torch.Tensor, values: torch.Tensor, num_rows: int) -> torch.Tensor:
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, (num_rows, values.shape[1]), is_coalesced=True,
                                   check_invariants=False)


def _table_gradients(ids, x, grad_out, grad_pre, gates, pre, down, up, activation, trainable,
                     need_down: bool, need_up: bool, blocks: Blocks):
    """Sparse COO gradients of ``down`` and ``up``: one row per distinct trainable expert used."""
    sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)  # stable: each row sums in token order
    rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    if trainable is not None:  # frozen rows: no program, no value
        keep = trainable[rows]
        rows, counts, starts, ends = rows[keep], counts[keep], starts[keep], ends[keep]
    schedule = torch.argsort(counts, descending=True)
    d = x.shape[1]
    grad_down = down.new_empty(rows.numel(), d) if need_down else None
    grad_up = up.new_empty(rows.numel(), d) if need_up else None
    if rows.numel():
        grid = (rows.numel(), triton.cdiv(d, blocks.row_dim))
        _rows_kernel[grid](
            schedule, starts, ends, order, x, grad_out, grad_pre, gates, pre,
            grad_down if need_down else grad_up, grad_up if need_up else grad_down,
            d, ids.shape[1], x.stride(0), grad_out.stride(0),
            ACTIVATION=activation, DOWN=need_down, UP=need_up, BLOCK_P=blocks.pairs, BLOCK_D=blocks.row_dim,
            num_warps=_num_warps(blocks.pairs * blocks.row_dim),
        )
    return (_sparse(rows, grad_down, down.shape[0]) if need_down else None,
            _sparse(rows, grad_up, up.shape[0]) if need_up else None)


class TritonExpertMix(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # no casts: the kernels read any float dtype, add in fp32
    def forward(ctx, x, ids, gates, down, up, activation, trainable, blocks):
        x, ids, gates = _rows(x), ids.contiguous(), gates.contiguous()
        down, up = _rows(down), _rows(up)
        blocks = blocks or Blocks.for_dim(x.shape[1])
        out = torch.empty(x.shape[0], x.shape[1], dtype=up.dtype, device=x.device)
        pre = torch.empty(ids.shape, dtype=torch.float32, device=x.device)  # (M, E), kept for the backward
        if ids.numel():
            weights = pre if x.shape[1] <= blocks.dim else torch.empty_like(pre)  # (unused when fused)
            _token_pass(x, ids, gates, pre, down, up, weights, pre, out, activation, False, blocks)
        else:
            out.zero_()
        ctx.save_for_backward(x, ids, gates, down, up, pre, trainable)
        ctx.activation, ctx.blocks = activation, blocks
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, ids, gates, down, up, pre, trainable = ctx.saved_tensors
        need_x, _, need_gates, need_down, need_up = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        new = torch.empty_like if ids.numel() else torch.zeros_like  # the kernels write every element
        grad_pre = new(pre)  # (M, E) fp32
        grad_gates = new(gates)
        grad_x = new(x) if need_x else None
        if ids.numel():
            _token_pass(grad_out, ids, gates, pre, up, down, grad_pre, grad_gates, grad_x if need_x else grad_out,
                        ctx.activation, True, ctx.blocks, need_sum=need_x)
        grad_down = grad_up = None
        if need_down or need_up:
            grad_down, grad_up = _table_gradients(ids, x, grad_out, grad_pre, gates, pre, down, up, ctx.activation,
                                                  trainable, need_down, need_up, ctx.blocks)
        return grad_x, None, grad_gates if need_gates else None, grad_down, grad_up, None, None, None


def expert_mix_triton(
    x: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    activation: str = "gelu",
    trainable: torch.Tensor | None = None,
    *,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """``peer_model.experts.expert_mix`` on Triton kernels: x (M, d); ids, gates (M, E); down, up (N, d);
    trainable: optional bool (N,) row mask. Returns (M, d) in the tables' dtype. Gradients of
    ``down``/``up`` are sparse COO tensors holding only the trainable rows used here, coalesced."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2 or ids.dim() != 2 or gates.shape != ids.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (M, d), ids and gates (M, E); got {tuple(x.shape)}, {tuple(ids.shape)}, "
                         f"{tuple(gates.shape)}")
    if down.shape != up.shape or down.shape[1] != x.shape[1]:
        raise ValueError(f"expected down and up (N, {x.shape[1]}); got {tuple(down.shape)}, {tuple(up.shape)}")
    return TritonExpertMix.apply(x, ids, gates, down, up, activation, trainable, blocks)


def forward_bytes(tokens: int, slots: int, d: int, table_bytes: int = 4, act_bytes: int = 4,
                  gate_bytes: int = 4) -> int:
    """Bytes the forward reads and writes from memory (see the note at the top): the achieved
    bandwidth of a timed forward is ``forward_bytes(...) / seconds``."""
    per_token = 2 * slots * d * table_bytes + 2 * d * act_bytes + slots * (8 + gate_bytes + 4)
    return tokens * per_token
