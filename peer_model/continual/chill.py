"""Add and chill (``old_lr_scale``): everything that existed before the stage learns at a fraction of its rate,
new experts at the full rate."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..model import PEERTransformer


def _chill_scales(model: PEERTransformer, before: Mapping[int, tuple[int, int, int]],
                  scale: float) -> dict[int, float | torch.Tensor]:
    """Learning-rate multipliers for add-and-chill: ``scale`` for every parameter that existed before
    the stage and for old expert rows; 1 for new expert rows and the sub-key tables (their old rows
    are held by ``freeze_old_sub_keys`` where asked)."""
    if scale == 1.0:
        return {}
    scales: dict[int, float | torch.Tensor] = {id(p): scale for p in model.parameters()}
    for i, layer in model.peer_layers().items():
        rows = torch.ones(layer.num_experts)
        rows[: before[i][2]] = scale
        scales[id(layer.expert_down)] = scales[id(layer.expert_up)] = rows
        scales[id(layer.sub_keys1)] = scales[id(layer.sub_keys2)] = 1.0
    return scales
