"""Named model shapes: the CPU defaults and sizes meant for one GPU.

``gpu-base`` is the shape of the paper's language-modelling runs at its smaller end (d 1024, 12 blocks,
one PEER layer of 1024² experts, 8 heads × top-16, d_key 128). Its memory on one GPU, with bf16
parameters and fp32 optimizer state (:mod:`peer_model.train`): the two expert tables hold
2 × 1024² × 1024 parameters = 4.3 GB in bf16, their optimizer state (a first moment per value and a
second moment per row, fp32) 8.6 GB; the dense part (144 M parameters) 2.0 GB with its fp32 master
weights and AdamW's moments (14 bytes a parameter). About 15 GB before activations: an H200 (141 GB)
trains it with room for long batches and serves it with hundreds of concurrent sequences.
``gpu-large`` (d 2048, 24 blocks, PEER in blocks 6, 12 and 18) holds 12.9 G expert parameters (25.8 GB
in bf16, 51.5 GB of optimizer state) and 1.1 G dense ones (15.6 GB): ~93 GB, one H200 with a smaller
batch.

The GPU shapes use the ``mssp`` parameterization (peer_model/parameterization.py) with the base width
of ``cpu-small`` (192), where the service's learning rates were tuned: on the CPU sweep of BENCHMARKS.md
13 the best learning rate moved at most one grid step (2×) across a 4× width range under mssp, and fell
by 1 to 3 grid steps as the width grew under ``standard``, so the same rates at d 1024 would likely be
several times too high (an extrapolation from d ≤ 128: no GPU has measured it).
``cpu-small`` itself is its own base (m = 1): standard and mssp are the same model there, and it stays
``standard``.
"""
from __future__ import annotations

from dataclasses import replace

from .config import ModelConfig, PEERConfig

PRESETS: dict[str, ModelConfig] = {
    # the service's default fresh model: learns Shakespeare to ~2.2 bits per byte in minutes on 2 cores
    "cpu-small": ModelConfig(d_model=192, n_layers=4, n_heads=4, d_ff=768, max_seq_len=256,
                             peer=PEERConfig(num_experts=128 * 128, heads=4, top_k=16, d_key=64)),
    "gpu-base": ModelConfig(d_model=1024, n_layers=12, n_heads=16, d_ff=4096, max_seq_len=2048,
                            peer=PEERConfig(num_experts=1024 * 1024, heads=8, top_k=16, d_key=128),
                            parameterization="mssp", mssp_base_width=192),
    "gpu-large": ModelConfig(d_model=2048, n_layers=24, n_heads=16, d_ff=8192, max_seq_len=2048,
                             peer_layers=[6, 12, 18],
                             peer=PEERConfig(num_experts=1024 * 1024, heads=8, top_k=16, d_key=128),
                             parameterization="mssp", mssp_base_width=192),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """The shape ``name`` with any ModelConfig field replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    config = PRESETS[name]
    if "n_layers" in overrides and "peer_layers" not in overrides:
        overrides["peer_layers"] = None  # the middle block of the new depth
    return replace(config, **overrides)

