"""Replay and distillation: the loss that adds ``weight`` × KL(parent ‖ child) on replayed old windows (or on
every window, Lifelong-MoE style) to the next-byte loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed.shards import ColumnShards
from ..model import PEERTransformer
from ..train import LossFn, autocast_for, next_byte_loss


def distillation_loss(teacher: PEERTransformer, weight: float, old_rows_only: bool,
                      shards: ColumnShards | None = None) -> LossFn:
    """Next-byte cross-entropy + ``weight`` · KL(teacher ‖ model) on the windows from earlier corpora
    (``old_rows_only``: rows whose MixedData source is >= 0) or on every window (Lifelong-MoE style), the KL
    averaged over the positions of those windows.

    With ``shards`` this process holds its rows of a batch split over several (see :func:`continual_stage`):
    the KL is averaged over the distilled positions of the whole batch (the processes' gradients are then
    averaged, as one process' on the whole batch would be), and the sharded teacher runs on every process,
    also one with no such window in its rows, since its forward exchanges columns with the others."""

    def loss_fn(logits, inputs, targets, extras):
        loss = next_byte_loss(logits, inputs, targets, extras)
        if not old_rows_only:
            rows = torch.ones(len(inputs), dtype=torch.bool, device=inputs.device)
        elif extras:
            rows = extras[0] >= 0
        else:
            return loss  # plain TokenData: no replayed windows
        windows, processes = rows.sum().reshape(1).float(), 1
        if shards is not None:
            windows, processes = shards.all_reduce_(windows), shards.size
        if not bool(windows):
            return loss
        with torch.no_grad(), autocast_for(inputs.device):
            teacher_logits = teacher(inputs[rows])
        kl = F.kl_div(F.log_softmax(logits[rows].float(), -1).flatten(0, 1),
                      F.log_softmax(teacher_logits.float(), -1).flatten(0, 1), reduction="sum", log_target=True)
        return loss + weight * kl * processes / (windows[0] * logits.shape[1])

    return loss_fn
