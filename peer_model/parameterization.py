"""Parameterizations: how initialisation and learning rates change with the model's width.

``standard`` (the default) is what the models have always done: dense weights drawn at a fixed std of
0.02 whatever the width, and one peak learning rate per optimizer (``lr`` for AdamW, ``expert_lr`` for
the expert tables), so a learning rate tuned at one width is not expected to hold at another.

``mssp`` is a maximal-update-style parameterization for Adam (Yang et al. 2022, "Tensor Programs V";
the MoE paper "How to Scale Mixture-of-Experts: From muP to the Maximally Scale-Stable
Parameterization" extends it to expert layers), written as multipliers relative to a base model of
width ``d0 = ModelConfig.mssp_base_width``, where it coincides with ``standard``. With m = d / d0:

* hidden matrices, whose fan-in grows with the width (attention, dense and MoE expert matrices, MoE
  routers, the PEER / PKM query projections, MH-MoE's split and merge, PEER's down vectors u_i, which
  are dotted with x): learning rate × 1/m, since Adam's update to a fan-in-n matrix moves its output
  by ~n · lr; those drawn at the fixed std 0.02 are drawn at 0.02 / √m (1 / √fan-in);
* vectors whose fan-in does not grow with the width (the tied byte embedding, norms, biases, PEER's
  up vectors v_i and PKM's values, mixed over a fixed number h·k of selected rows, and the product
  sub-keys, dotted with d_key-sized half-queries): learning rate and init unchanged;
* the logits are multiplied by 1 / m (muP's output multiplier: with tied embeddings the output layer
  is the embedding table, whose init and learning rate stay those of an input layer).

Pool size and sparsity: SparseRowAdam normalises each selected row's update by that row's own second
moment, so a step moves a token's expert output by ~h·k·lr whatever the pool size N; no N multiplier
is applied, and whether the optimum holds across N is measured (BENCHMARKS.md 13), not assumed.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig

# parameters the model draws at a fixed std (0.02, or 0.02 / √(2·n_layers) on the residual side), by the
# name of the module or parameter that holds them
FIXED_STD = ("qkv", "out", "up", "down", "q_proj", "k_proj", "v_experts", "o_experts", "w_up", "w_down",
             "router")
# vectors whose fan-in does not grow with the width (see the module docstring)
WIDTH_FREE = ("expert_up", "values", "sub_keys1", "sub_keys2")


def width_multiplier(config: ModelConfig) -> float:
    """m = d / d0 under mssp; 1 under standard."""
    return config.d_model / config.mssp_base_width if config.parameterization == "mssp" else 1.0


def logit_scale(config: ModelConfig) -> float:
    return 1.0 / width_multiplier(config)


@torch.no_grad()
def scale_init(model: nn.Module, config: ModelConfig) -> None:
    """Under mssp, multiply every fixed-std weight matrix by 1/√m (a draw at std 0.02/√m from the same
    random numbers: the standard model's draws are untouched). Nothing happens under standard."""
    m = width_multiplier(config)
    if m == 1.0:
        return
    for name, param in model.named_parameters():
        parts = name.split(".")
        holder = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
        if parts[-1] != "bias" and holder in FIXED_STD and param.dim() >= 2:
            param.mul_(m**-0.5)


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the parameters whose fan-in grows with the width: every ≥ 2-D parameter except embedding
    tables and the width-free vectors."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {id(p) for name, p in model.named_parameters()
            if p.dim() >= 2 and id(p) not in embeddings and name.split(".")[-1] not in WIDTH_FREE
            and not name.startswith("lm_head.")}  # an untied output layer: muP's output multiplier covers it


def lr_multipliers(model: nn.Module, config: ModelConfig) -> dict[int, float]:
    """Per-parameter learning-rate multipliers (by ``id``) of the parameterization; empty under standard,
    so the optimizer groups are exactly those of a model without the option."""
    m = width_multiplier(config)
    if config.parameterization != "mssp" or m == 1.0:
        return {}
    return {pid: 1.0 / m for pid in hidden_matrices(model)}


def combine(scales: dict[int, float | torch.Tensor], extra: dict[int, float]) -> dict[int, float | torch.Tensor]:
    """Caller's multipliers (floats or per-row tensors) times the parameterization's."""
    out = dict(scales)
    for pid, factor in extra.items():
        out[pid] = out[pid] * factor if pid in out else factor
    return out

