"""Replay and distillation: the loss that adds ``weight`` × KL(parent ‖ child) on replayed old windows (or on
every window, Lifelong-MoE style) to the next-byte loss, both through the output layer a chunk of tokens at a time
(peer_model/head_loss.py)."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..distributed.shards import ColumnShards
from ..head_loss import head_loss
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

    def loss_fn(head, inputs, targets, extras):
        if not old_rows_only:
            rows = torch.ones(len(inputs), dtype=torch.bool, device=inputs.device)
        elif extras:
            rows = extras[0] >= 0
        else:
            return next_byte_loss(head, inputs, targets, extras)  # plain TokenData: no replayed windows
        windows, processes = rows.sum().reshape(1).float(), 1
        if shards is not None:
            windows, processes = shards.all_reduce_(windows), shards.size
        if not bool(windows):
            return next_byte_loss(head, inputs, targets, extras)
        with torch.no_grad(), autocast_for(inputs.device):
            teacher_head = teacher.head(inputs[rows], head.chunk_tokens)
        hidden = teacher_head.hidden.new_zeros(head.hidden.shape)  # rows without a KL term are never read
        hidden[rows] = teacher_head.hidden
        kl_weights = torch.zeros(targets.shape, device=targets.device)
        kl_weights[rows] = weight * processes / (windows[0] * targets.shape[1])
        return head_loss(head, targets, 1.0 / targets.numel(), replace(teacher_head, hidden=hidden), kl_weights)

    return loss_fn
