"""The output layer fused with the training losses, a chunk of tokens at a time: no (tokens × vocab) tensor is held.

A training batch of 16 × 128 tokens over SmolLM2's 49,152-token vocabulary has 403 MB of fp32 logits; the
cross-entropy keeps a log-softmax of that size for its backward, and distillation adds the teacher's logits and
both distributions again. As Liger-Kernel's fused linear cross-entropy does, :func:`head_loss` computes each chunk's
logits, its loss terms and, at once, their gradient with respect to the chunk's hidden states (and to the output
weight when it trains); the backward only scales the stored gradients by the incoming one. Nothing is recomputed,
and the extra memory is one chunk's logits.

The loss, over the N tokens of a batch (logits ``z_t = scale · W h_t``, the teacher's ``z'_t``)::

    Σ_t  ce_w[t] · CE(z_t, y_t)  +  kl_w[t] · KL(softmax(z'_t) ‖ softmax(z_t))

whose gradient with respect to ``z_t`` is ``ce_w[t] · (softmax(z_t) − onehot(y_t)) + kl_w[t] · (softmax(z_t) −
softmax(z'_t))``. The logits are computed as the output layer computes them (under CUDA autocast in bf16) and the
losses in fp32, as ``logits.float()`` did. :meth:`Head.logits` gives the full tensor where one is wanted.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Head:
    """A batch's final hidden states (B, T, d) (after the final norm) and the output layer that turns them into
    logits (``scale · hidden @ weight.T``); losses take it in chunks of ``chunk_tokens`` tokens (0: all at once)."""

    hidden: torch.Tensor
    weight: torch.Tensor  # (vocab, d)
    scale: float = 1.0
    chunk_tokens: int = 0

    def logits(self) -> torch.Tensor:
        """The full (B, T, vocab) logits."""
        return _logits(self.hidden, self.weight, self.scale)

    def rows(self, rows: torch.Tensor) -> Head:
        """The same head on the batch rows ``rows`` (a mask or indices)."""
        return replace(self, hidden=self.hidden[rows])


def _logits(hidden: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    return logits if scale == 1.0 else logits * scale


def head_loss(head: Head, targets: torch.Tensor, ce_weights: torch.Tensor | float,
              teacher: Head | None = None, kl_weights: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The weighted sum above, a scalar. ``targets``: (B, T) ids; ``ce_weights``, ``kl_weights``: per token (B, T)
    or one number for all; ``teacher``: the teacher's head on the same tokens (no gradient), needed when
    ``kl_weights`` is not 0."""
    shape = head.hidden.shape[:-1]
    ce = torch.as_tensor(ce_weights, dtype=torch.float32, device=head.hidden.device).expand(shape).reshape(-1)
    kl = torch.as_tensor(kl_weights, dtype=torch.float32, device=head.hidden.device).expand(shape).reshape(-1)
    teacher_hidden = None if teacher is None else teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1])
    return _HeadLoss.apply(head.hidden.reshape(-1, head.hidden.shape[-1]), head.weight, targets.reshape(-1), ce, kl,
                           head.scale, head.chunk_tokens, teacher_hidden, teacher)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ce, kl, scale, chunk_tokens, teacher_hidden, teacher):
        tokens = hidden.shape[0]
        chunk = chunk_tokens or max(tokens, 1)
        wants_weight = ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, tokens, chunk):  # forward runs without autograd: nothing here is recorded
            part = slice(start, min(tokens, start + chunk))
            h, y, ce_part, kl_part = hidden[part], targets[part], ce[part].unsqueeze(1), kl[part].unsqueeze(1)
            log_q = F.log_softmax(_logits(h, weight, scale).float(), dim=-1)  # (n, vocab)
            total += (ce_part * -log_q.gather(1, y.unsqueeze(1))).sum()
            distilled = (kl_part != 0).squeeze(1) if teacher is not None else None  # tokens with a KL term
            if distilled is not None and bool(distilled.any()):
                log_p = F.log_softmax(_logits(teacher_hidden[part][distilled], teacher.weight, teacher.scale).float(),
                                      dim=-1)
                p = log_p.exp()
                total += (kl_part[distilled] * p * (log_p - log_q[distilled])).sum()
                del log_p
            else:
                distilled = None
            if grad_hidden is None and not wants_weight:  # evaluation: the loss alone
                continue
            grad_z = log_q.exp_()  # softmax(z), in place: log_q is done with
            grad_z *= ce_part + kl_part
            grad_z[torch.arange(len(y), device=y.device), y] -= ce_part.squeeze(1)
            if distilled is not None:
                grad_z[distilled] -= kl_part[distilled] * p
            grad_z = (grad_z * scale).to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = (grad_z @ weight).to(hidden.dtype)
            if wants_weight:
                grad_weight += (grad_z.t() @ h.to(weight.dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None
