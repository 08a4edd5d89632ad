"""Forgetting on request: a child without what a corpus' own segments hold (masked out of retrieval's reach),
optionally repaired on the remaining corpora."""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from ..model import PEERTransformer
from ..train import TokenData, TrainConfig, TrainResult, resolve_device, train
from .data import MixedData
from .distillation import distillation_loss
from .freezing import _restore_trainable


def forget_segments(parent: PEERTransformer, segments: Mapping[int, Sequence[int]],
                    remaining_train: Sequence[TokenData], repair_steps: int = 0,
                    train_cfg: TrainConfig | None = None, distill_weight: float = 1.0,
                    should_stop: Callable[[], bool] | None = None) -> tuple[PEERTransformer, TrainResult | None]:
    """A child of ``parent`` without the knowledge held in ``segments`` ({PEER layer: segment indices}):
    those segments are masked (out of retrieval's reach, see pool.py), and with ``repair_steps`` the
    child trains that many steps on the ``remaining_train`` corpora (uniformly mixed) with
    ``distill_weight`` × KL to the parent there, so what the remaining corpora had routed to the masked
    experts is relearnt elsewhere (the masked experts cannot be selected, so they stay as they were).
    The parent is unchanged. Returns the child and the repair's result (None without repair)."""
    layers = parent.peer_layers()
    for i, indices in segments.items():
        if i not in layers:
            raise ValueError(f"block {i} has no PEER layer")
        for index in indices:
            if not 0 < index < len(layers[i].segments):
                raise ValueError(f"layer {i} has no grown segment {index} (the initial segment cannot be masked)")
    if repair_steps and not remaining_train:
        raise ValueError("repairing needs the remaining corpora's text")
    child = copy.deepcopy(parent)
    _restore_trainable(child)
    for i, indices in segments.items():
        for index in indices:
            child.peer_layers()[i].set_segment_status(index, "masked")
    if not repair_steps:
        return child, None
    cfg = replace(train_cfg or TrainConfig(), steps=repair_steps, warmup_steps=max(1, repair_steps // 10),
                  log_every=max(1, repair_steps // 4), eval_every=10**9)
    teacher = copy.deepcopy(parent).to(resolve_device(cfg.device)).eval()
    loss_fn = distillation_loss(teacher, distill_weight, True) if distill_weight else None
    result = train(child, MixedData(remaining_train[0], remaining_train, 1.0), None, cfg, should_stop=should_stop,
                   loss_fn=loss_fn)
    return child, result
