"""Add and chill (``old_lr_scale``): everything that existed before the stage learns at a fraction of its rate
(dense layers, the query projection, old expert rows, old sub-key rows) and the query BatchNorm's running
statistics move at that fraction of their momentum; new experts and new sub-keys learn at the full rate."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..model import PEERTransformer


def _chill_scales(model: PEERTransformer, before: Mapping[int, tuple[int, int, int]],
                  scale: float) -> dict[int, float | torch.Tensor]:
    """Learning-rate multipliers for add-and-chill: ``scale`` for every parameter that existed before
    the stage and for the old rows of the expert and sub-key tables; 1 for their new rows."""
    if scale == 1.0:
        return {}
    scales: dict[int, float | torch.Tensor] = {id(p): scale for p in model.parameters()}
    for i, layer in model.peer_layers().items():
        for table, old in ((layer.expert_down, before[i][2]), (layer.expert_up, before[i][2]),
                           (layer.sub_keys1, before[i][0]), (layer.sub_keys2, before[i][1])):
            rows = torch.ones(table.shape[0])
            rows[:old] = scale
            scales[id(table)] = rows
    return scales


@contextmanager
def _chilled_statistics(model: PEERTransformer, scale: float) -> Iterator[None]:
    """Within the block, the query BatchNorms' running statistics move at ``scale`` × their momentum."""
    norms = [layer.query_norm for layer in model.peer_layers().values()
             if isinstance(layer.query_norm, nn.modules.batchnorm._BatchNorm) and layer.query_norm.momentum]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum *= scale
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
