"""Optimizer for expert tables whose gradients are sparse row sets (see experts.py).

``SparseRowAdam`` is Adam applied lazily, row by row: a step reads and writes only the rows present in
the gradient (the experts the batch used), so an untouched expert costs nothing: no dense ``[N, d]``
gradient, no optimizer pass over all N rows. Each row keeps its own step count, so its bias correction
is that of a plain Adam that has seen exactly the steps in which the row was used (a global step count,
as in ``torch.optim.SparseAdam``, would under-correct the first update of a rarely used expert).
Frozen experts never appear in the gradient, so they stay bit-identical.
"""
from __future__ import annotations

import torch


class SparseRowAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid SparseRowAdam hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

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
                grad = param.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                if rows.numel() == 0:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros(param.shape[0], dtype=torch.int32, device=param.device)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                steps = state["step"].index_select(0, rows) + 1
                state["step"].index_copy_(0, rows, steps)
                exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, exp_avg)
                state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
                steps = steps.to(values.dtype).unsqueeze(1)
                denom = (exp_avg_sq / (1 - beta2**steps)).sqrt_().add_(eps)
                update = exp_avg.div_(1 - beta1**steps).div_(denom)
                weights = param.index_select(0, rows)
                if decay:
                    weights.mul_(1 - lr * decay)
                param.index_copy_(0, rows, weights.sub_(update, alpha=lr))
        return loss
