"""Grow and freeze: what a stage freezes (old experts, dense layers, old sub-key rows) and how every parameter is
made trainable again afterwards."""
from __future__ import annotations

import torch
from torch import nn

from ..model import PEERTransformer
from ..peer import PEER


def _routing_params(layer: PEER) -> list[nn.Parameter]:
    return [layer.sub_keys1, layer.sub_keys2, *layer.query.parameters(), *layer.query_norm.parameters()]



def _freeze_dense(model: nn.Module) -> None:
    """requires_grad=False for everything but the PEER layers' experts and routing."""
    keep = {id(p) for layer in model.modules() if isinstance(layer, PEER)
            for p in (layer.expert_down, layer.expert_up, *_routing_params(layer))}
    for param in model.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)



def _zero_rows_hook(rows: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:rows] = 0
        return grad
    return hook



def _restore_trainable(model: nn.Module) -> None:
    """Every expert row trainable, and every parameter as the model's config says (``base_trains``: a
    retrofitted pretrained model's base stays frozen whatever a stage froze or unfroze)."""
    if isinstance(model, PEERTransformer):
        model.restore_trainable()
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    for layer in model.modules():
        if isinstance(layer, PEER):
            layer.set_trainable(slice(None), True)
