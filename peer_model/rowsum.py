"""Summing per-(token, slot) contributions into table rows, fast on CPU and GPU.

Both the expert tables and the sub-key tables get gradients of the form
``grad[r] = Σ_{(t, s): index[t, s] = r} weights[t, s] · vectors[t]``. ``index_add_`` does this with
one atomic/serial add per (t, s) and was measured 10× slower on CPU than a sparse CSR × dense product
(108 ms vs 10 ms for 262k entries × 64 columns), which is what :class:`RowSum` builds.
"""
from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class RowSum:
    """The pattern ``index: (T, S)`` → CSR matrix (distinct rows × T), reusable for several value sets."""

    def __init__(self, index: torch.Tensor):
        tokens, slots = index.shape
        self.rows, inverse = torch.unique(index.reshape(-1), sorted=True, return_inverse=True)
        self.order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=self.rows.numel())
        self.crow = torch.zeros(self.rows.numel() + 1, dtype=torch.long, device=index.device)
        torch.cumsum(counts, 0, out=self.crow[1:])
        self.col = torch.div(self.order, slots, rounding_mode="floor")  # token of each entry
        self.tokens = tokens

    def __call__(self, weights: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``(len(self.rows), d)``: row i sums ``weights[t, s] · vectors[t]`` over ``index[t, s] = rows[i]``."""
        matrix = torch.sparse_csr_tensor(
            self.crow, self.col, weights.reshape(-1)[self.order], size=(self.rows.numel(), self.tokens),
            check_invariants=False,
        )
        return matrix @ vectors

    def dense(self, weights: torch.Tensor, vectors: torch.Tensor, num_rows: int) -> torch.Tensor:
        out = vectors.new_zeros(num_rows, vectors.shape[1])
        return out.index_copy_(0, self.rows, self(weights, vectors))
