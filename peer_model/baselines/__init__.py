"""The feed-forward and attention options of a block, chosen by ``ModelConfig.ffw`` / ``.attention``.

Every feed-forward maps (..., d_model) to (..., d_model) and has an ``aux_loss`` attribute: the weighted
auxiliary loss of its last forward in training mode (a zero-dimensional tensor), or None when it has
none; :meth:`peer_model.model.PEERTransformer.aux_loss` sums them for the training loop.
"""
from __future__ import annotations

from torch import nn

from ..attention import Attention
from ..config import ModelConfig
from ..peer import PEER
from ..pool import ExpertGrid
from .dense import FeedForward, SwiGLU, dense_mlp
from .moe import ExpertChoiceMoE, NoisyTopKMoE, SwitchMoE
from .pkm import ProductKeyMemory
from .switchhead import SwitchHeadAttention


def make_ffw(config: ModelConfig, grid: ExpertGrid | None = None) -> nn.Module:
    """The feed-forward of an expert block (``config.peer_layers``); ``grid`` restores a grown PEER pool."""
    kind, d, d_ff = config.ffw, config.d_model, config.d_ff
    if kind == "peer":
        return PEER(d, config.peer, grid)
    if kind == "dense":
        return FeedForward(d, d_ff)
    if kind == "swiglu":
        return SwiGLU(d, d_ff)
    if kind == "pkm":
        return ProductKeyMemory(d, config.pkm)
    return {"moe": NoisyTopKMoE, "switch": SwitchMoE, "expert_choice": ExpertChoiceMoE}[kind](d, d_ff, config.moe)


def make_attention(config: ModelConfig) -> nn.Module:
    if config.attention == "switchhead":
        return SwitchHeadAttention(config)
    return Attention(config)
