"""Optimizer for expert tables whose gradients are sparse row sets (see experts.py).

``SparseRowAdam`` is Adam applied lazily, row by row: a step reads and writes only the rows present in
the gradient (the experts the batch used), so an untouched expert costs nothing: no dense ``[N, d]``
gradient, no optimizer pass over all N rows. Frozen experts never appear in the gradient, so they stay
bit-identical.

Two choices differ from dense Adam, both made for a pool of a million single-neuron experts:

* the second moment is one scalar per row, the running mean of the row's squared gradient (as
  row-wise AdaGrad does for embedding tables in recommender systems). An expert row is one neuron's
  input or output vector, whose coordinates share a scale; keeping ``N`` scalars instead of ``N × d``
  halves the optimizer state and cuts the memory traffic that bounds a sparse step;
* each row keeps its own step count, so its bias correction is that of an Adam that has seen exactly
  the steps in which the row was used (a global count, as in ``torch.optim.SparseAdam``, under-corrects
  the first update of a rarely used expert).

The state is fp32 whatever the table's dtype, so bf16 tables (on GPU) keep full-precision moments.
"""
from __future__ import annotations

import torch


class SparseRowAdam(torch.optim.Optimizer):
    """A parameter group may carry ``row_lr``: a (rows,) tensor multiplying each row's learning rate."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid SparseRowAdam hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        # Rows are updated in chunks that fit in cache: each chunk is gathered, updated and scattered
        # back while hot, and its same-sized temporaries are recycled by the allocator.
        self.rows_per_chunk = 8192

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not param.grad.is_sparse:
                    raise TypeError("SparseRowAdam needs sparse row gradients (use experts.expert_mix)")
                grad = coalesced(param.grad)
                rows, values = grad.indices()[0], grad.values()
                if rows.numel() == 0:
                    continue
                state = self.state[param]
                if not state:  # fp32 whatever the table's dtype: bf16 moments would lose small updates
                    state["step"] = torch.zeros(param.shape[0], dtype=torch.int32, device=param.device)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
                row_lr = group.get("row_lr")
                squares = row_square_means(param, values)
                for start in range(0, rows.numel(), self.rows_per_chunk):
                    chunk = slice(start, start + self.rows_per_chunk)
                    _update_rows(param, state, rows[chunk], values[chunk], squares[chunk], lr, beta1, beta2, eps,
                                 decay, row_lr)
        return loss


def row_square_means(param: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The mean squared gradient of each row in ``values`` (rows, d), fp32. A table whose columns are split
    over processes (peer_model/distributed) carries ``column_shards``, which averages over every shard's
    columns, so each shard takes the step the whole table would."""
    sums = torch.linalg.vector_norm(values, dim=1, dtype=torch.float32).square_()  # no (rows, d) temporary
    shards = getattr(param, "column_shards", None)
    return sums / values.shape[1] if shards is None else shards.row_means(sums, values.shape[1])


def _update_rows(param, state, rows, values, squares, lr, beta1, beta2, eps, decay, row_lr=None) -> None:
    """Adam with a row-wise second moment (``squares``: each row's mean squared gradient) on the distinct
    ``rows`` of ``param``; ``row_lr`` (optional, one multiplier per row of ``param``) scales each row's
    learning rate. The update is computed in fp32 and rounded once into ``param``'s dtype (bf16 tables on
    GPU)."""
    values = values.float()
    steps = state["step"].index_select(0, rows) + 1
    state["step"].index_copy_(0, rows, steps)
    exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
    state["exp_avg"].index_copy_(0, rows, exp_avg)
    exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).lerp_(squares, 1 - beta2)
    state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
    steps = steps.to(values.dtype)
    # per row: -lr / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps)
    scale = (exp_avg_sq / (1 - beta2**steps)).sqrt_().add_(eps).reciprocal_()
    scale.mul_(-lr / (1 - beta1**steps))
    weights = param.index_select(0, rows).float()
    if row_lr is not None:
        rates = row_lr.index_select(0, rows)
        scale.mul_(rates)
        if decay:
            weights.mul_((1 - lr * decay * rates).unsqueeze(1))
    elif decay:
        weights.mul_(1 - lr * decay)
    # rows are distinct: gather, update, scatter back (index_add_ is ~5x slower on CPU)
    param.index_copy_(0, rows, weights.addcmul_(exp_avg, scale.unsqueeze(1)).to(param.dtype))


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with distinct, sorted rows, flagged as coalesced.

    Autograd drops the coalesced flag when it stores a sparse gradient, though one backward of
    ``expert_mix`` yields sorted distinct rows; checking that is far cheaper than coalescing again.
    """
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if grad.sparse_dim() == 1 and bool((rows[1:] > rows[:-1]).all()):
        return torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True,
                                       check_invariants=False)
    return grad.coalesce()
