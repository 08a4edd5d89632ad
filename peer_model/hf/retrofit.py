"""Retrofit: PEER layers inserted into chosen blocks of a pretrained model.

Two placements (``branch``):

* ``parallel`` (default): the block keeps its dense feed-forward and the expert layer is added beside
  it on the same normalised input, x + FFN(h) + PEER(h). The new experts' up-vectors start at zero, so
  the retrofitted model computes exactly what the pretrained one did (logits equal); training then
  moves the up-vectors first (their gradient is g·σ(uᵀx), non-zero) and everything else after, as
  LoRA's zero-initialised B does;
* ``replace``: the expert layer takes the dense feed-forward's place. The pretrained block's function
  is lost at insertion and must be learnt back (measured in BENCHMARKS.md: the parallel branch is the
  default because it starts from the pretrained loss and stays below ``replace`` after training).

The base (embeddings, attention, dense feed-forwards, norms) is frozen by default (``base_trains``
"none"; "norms" also trains the norms; "all" everything); the pool and its routing train, and growth
and every continual strategy work on the result like on any PEER model.
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..config import ModelConfig, PEERConfig
from ..model import PEERTransformer


SPREAD = re.compile(r"spread:([0-9]+)")


def resolve_layers(spec: str | list[int], n_layers: int) -> list[int]:
    """``middle`` (the paper's single middle block), ``all``, ``spread:K`` (K blocks evenly spaced through the
    depth, none at either end: 6, 12, 18, 24 of 30 for K = 4; every block of a base with at most K), or block
    indices ("1,3" or a list)."""
    if spec == "middle":
        return [n_layers // 2]
    if spec == "all":
        return list(range(n_layers))
    spread = SPREAD.fullmatch(spec) if isinstance(spec, str) else None
    if spread is not None:
        count = int(spread.group(1))
        if count < 1:
            raise ValueError(f"retrofit layers {spec!r}: at least 1 block")
        return sorted({n_layers * (i + 1) // (count + 1) for i in range(count)} if count < n_layers
                      else range(n_layers))
    try:
        layers = sorted({int(i) for i in (spec.split(",") if isinstance(spec, str) else spec)})
    except ValueError:
        layers = []
    bad = [i for i in layers if not 0 <= i < n_layers]
    if not layers or bad:
        raise ValueError(f"retrofit layers must be 'middle', 'all', 'spread:K' or indices in 0..{n_layers - 1}, "
                         f"got {spec!r}")
    return layers


def retrofit(base: PEERTransformer, peer: PEERConfig, layers: str | list[int] = "middle", branch: str = "parallel",
             base_trains: str = "none", seed: int = 0) -> PEERTransformer:
    """A copy of ``base`` (a model without expert layers, e.g. from :func:`peer_model.hf.load.load_hf`) with a
    PEER layer of shape ``peer`` in each of ``layers``; ``base`` is unchanged. In eval mode."""
    if base.config.peer_layers:
        raise ValueError(f"the base model already has expert layers in blocks {base.config.peer_layers}")
    config: ModelConfig = replace(base.config, peer_layers=resolve_layers(layers, base.config.n_layers), peer=peer,
                                  ffw="peer", peer_branch=branch, base_trains=base_trains)
    weight = base.embed.weight
    with torch.random.fork_rng(devices=[]), torch.device(weight.device):
        torch.manual_seed(seed)
        model = PEERTransformer(config).to(weight.dtype)
    base_state = base.state_dict()
    expected = model.state_dict()
    with torch.no_grad():
        for key, tensor in base_state.items():
            if key in expected:  # the dense feed-forward of a replaced block has no place any more
                expected[key].copy_(tensor)
        if branch == "parallel":
            for layer in model.peer_layers().values():
                layer.expert_up.zero_()
    model.tokenizer = base.tokenizer
    return model.eval()
