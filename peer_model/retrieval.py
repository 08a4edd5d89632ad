"""Exact top-k expert retrieval over product keys (PEER, Algorithm 1), and its brute-force reference.

Both functions take queries already split in halves, ``q1, q2: (M, d_key/2)``, the two sub-key sets
``keys1: (rows, d_key/2)``, ``keys2: (cols, d_key/2)`` and the :class:`~peer_model.pool.ExpertGrid`
that numbers their cells, and return ``(scores, ids)``, both ``(M, k)``, best first.
The score of expert (i, j) is ``q1·keys1[i] + q2·keys2[j]`` (+ ``offsets1[i] + offsets2[j]`` when the
sub-keys carry score offsets: a separable bias keeps the product-key search exact, and ``-inf`` takes a
sub-key, and every cell on it, out of reach). A set of cells that is not one product of rows and columns (a
masked segment's cells without the later cells that share its sub-keys, see pool.py) is searched as a union
of disjoint *regions*, each one such product given by its own offsets (:func:`multihead_retrieve`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .pool import ExpertGrid
from .rowsum import RowSum


class _ScoreTopK(torch.autograd.Function):
    """``(queries @ keys.T).topk(k)`` whose backward touches only the k selected keys per query.

    Autograd's own backward would scatter the (M, k) gradient into a dense (M, n) score gradient and
    run two more (M, n, d) matmuls; here ``dq = Σ_j g_j key_j`` and ``dkey_j += g_j q`` cost O(M k d).

    Scores are fp32 whatever the inputs' dtype (and the gradients are computed in fp32, then returned in
    each input's dtype): bf16 scores tie and round, and on a 1024² grid the top-16 sets of a bf16 model
    served without autocast differed from fp32's for 44% of (token, head) pairs. ``custom_fwd`` alone
    casts only under CUDA autocast.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, queries, keys, k, offsets=None):
        scores = queries.float() @ keys.float().t()
        if offsets is not None:
            scores = scores + offsets.float()
        scores, index = scores.topk(k, dim=-1)
        ctx.save_for_backward(queries, keys, index)
        return scores, index

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_scores, _grad_index):
        queries, keys, index = ctx.saved_tensors
        grad_scores = grad_scores.float()
        grad_queries = grad_keys = None
        if ctx.needs_input_grad[0]:
            grad_queries = F.embedding_bag(index, keys.float(), per_sample_weights=grad_scores,
                                           mode="sum").to(queries.dtype)
        if ctx.needs_input_grad[1]:
            grad_keys = RowSum(index).dense(grad_scores, queries.float(), keys.shape[0]).to(keys.dtype)
        return grad_queries, grad_keys, None, None


Offsets = tuple[torch.Tensor, torch.Tensor] | None  # per-sub-key score offsets of each half, or none
Regions = list[tuple[torch.Tensor, torch.Tensor]]  # disjoint products of rows and columns, each by its offsets


def product_key_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, grid: ExpertGrid, k: int,
    offsets: Offsets = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """O((rows + cols) · d_key + k²) per query: top-k of each half, then top-k of the k² sums.

    Exact: if (i, j) is in the overall top-k, then i is in the top-k of the first half (else k
    better cells (i', j) exist) and likewise j, so the k² candidates contain the answer. With offsets,
    the same holds for the offset half-scores.
    """
    offsets1, offsets2 = offsets if offsets is not None else (None, None)
    scores1, rows = _ScoreTopK.apply(q1, keys1, k, offsets1)  # (M, k)
    scores2, cols = _ScoreTopK.apply(q2, keys2, k, offsets2)  # (M, k)
    combined = (scores1.unsqueeze(-1) + scores2.unsqueeze(-2)).flatten(1)  # (M, k*k)
    scores, flat = combined.topk(k, dim=-1)  # (M, k)
    i = rows.gather(1, torch.div(flat, k, rounding_mode="floor"))
    j = cols.gather(1, flat % k)
    return scores, grid.cell_to_id(i, j)


def brute_force_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, grid: ExpertGrid, k: int,
    offsets: Offsets = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: materialise the full key of every expert id and score all N of them (in fp32, as the
    fast path does)."""
    i, j = grid.id_to_cell(torch.arange(grid.num_experts, device=q1.device))
    full_keys = torch.cat([keys1[i], keys2[j]], dim=1).float()  # (N, d_key): row n is the key of expert n
    scores = torch.cat([q1, q2], dim=1).float() @ full_keys.t()
    if offsets is not None:
        scores = scores + offsets[0][i] + offsets[1][j]
    return scores.topk(k, dim=-1)


def multihead_retrieve(
    queries: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, grid: ExpertGrid, d_key: int, k: int,
    reference: bool = False, regions: Regions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """queries (M, heads * d_key), already normalised → (weights, ids), both (M, heads * k): each head's
    exact top-k over the shared product keys, its k scores softmaxed (weights sum to 1 within a head); scores and
    weights are fp32 whatever the queries' dtype.
    ``reference``: the brute-force search. ``regions``: the searched cells as disjoint products of rows and
    columns, each given by per-sub-key score offsets (rows,), (cols,) (``-inf`` outside it); None: every cell.
    Several regions are searched one by one and their top-k merged: exact, since a cell of the union's top-k is
    in its own region's top-k. The first region must hold at least k cells, so that no out-of-region cell (at
    ``-inf``) is ever picked. Shared by the PEER layer and product-key memory."""
    m, heads = queries.shape[0], queries.shape[1] // d_key
    q = queries.reshape(-1, d_key)  # (M * heads, d_key)
    half = d_key // 2
    retrieve = brute_force_topk if reference else product_key_topk
    found = [retrieve(q[:, :half], q[:, half:], keys1, keys2, grid, k, offsets) for offsets in regions or [None]]
    scores, ids = found[0]
    if len(found) > 1:
        scores, best = torch.cat([s for s, _ in found], dim=1).topk(k, dim=-1)
        ids = torch.cat([i for _, i in found], dim=1).gather(1, best)
    weights = torch.softmax(scores, dim=-1)
    return weights.view(m, heads * k), ids.view(m, heads * k)  # M may be 0 (a process with no tokens)
