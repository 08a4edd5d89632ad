"""A stage's options: the strategy (``Strategy``, ``STRATEGIES``) and every knob of it, checked when built
(:class:`ContinualOptions`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..quantize import WEIGHT_FORMATS
from ..train import TrainConfig

Strategy = Literal["naive", "replay", "grow_freeze", "grow_freeze_protect", "sparse_finetune"]
STRATEGIES: tuple[str, ...] = ("naive", "replay", "grow_freeze", "grow_freeze_protect", "sparse_finetune")
_GROWING = ("grow_freeze", "grow_freeze_protect")


@dataclass
class ContinualOptions:
    strategy: Strategy = "grow_freeze"
    new_experts: int = 0  # per PEER layer, rounded up to fill the grid; 0 = no growth
    replay_fraction: float = 0.0  # fraction of each batch's windows drawn from earlier corpora
    distill_weight: float = 0.0  # weight of KL(parent || child); 0 = off
    distill_on: Literal["old", "all"] = "old"  # windows the KL is taken on: replayed old ones, or all
    sparse_top_experts: int = 0  # sparse_finetune: experts trained per PEER layer (besides new ones)
    usage_batches: int = 8  # sparse_finetune: batches of new (and of old) data the usage is counted on
    sparse_selection: Literal["batch", "stage"] = "batch"  # sparse_finetune: rank experts per batch or per stage
    freeze_old_sub_keys: bool = False
    freeze_query_batchnorm_stats: bool = False
    freeze_query: bool = False
    train_dense: bool | None = None  # None: True for naive/replay, False for the other strategies
    key_init: Literal["data", "random"] = "data"  # new sub-keys: the new corpus' queries, or random (peer.py)
    # replay earlier corpora, the parent's own samples, or both (a pretrained parent knows text no corpus holds)
    replay_source: Literal["corpora", "parent", "both"] = "corpora"
    generated_windows: int = 256  # replay_source "parent": windows of seq_len bytes sampled from the parent
    generated_batch: int = 128  # windows sampled together (one batched decode)
    generated_weights: str = "bfloat16"  # the weights the parent samples with (peer_model/quantize.py)
    old_lr_scale: float = 1.0  # learning-rate multiplier of everything that existed before the stage
    review_steps: int = 0  # routing-only review on half replay after training (needs earlier corpora)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        s = self.strategy
        if s not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {s!r}")
        if self.generated_weights not in WEIGHT_FORMATS:
            raise ValueError(f"generated_weights must be one of {', '.join(WEIGHT_FORMATS)}, "
                             f"got {self.generated_weights!r}")
        if self.generated_batch < 1:
            raise ValueError("generated_batch must be >= 1")
        for name in ("new_experts", "sparse_top_experts", "usage_batches", "review_steps", "generated_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.usage_batches < 1:
            raise ValueError("usage_batches must be >= 1")
        if not (isinstance(self.replay_fraction, (int, float)) and 0.0 <= self.replay_fraction < 1.0):
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction!r}")
        if not (isinstance(self.distill_weight, (int, float)) and math.isfinite(self.distill_weight)
                and self.distill_weight >= 0):
            raise ValueError(f"distill_weight must be a finite number >= 0, got {self.distill_weight!r}")
        if not (isinstance(self.old_lr_scale, (int, float)) and 0.0 <= self.old_lr_scale <= 1.0):
            raise ValueError(f"old_lr_scale must be in [0, 1], got {self.old_lr_scale!r}")
        if self.sparse_selection not in ("batch", "stage"):
            raise ValueError(f"sparse_selection must be 'batch' or 'stage', got {self.sparse_selection!r}")
        if self.replay_source not in ("corpora", "parent", "both"):
            raise ValueError(f"replay_source must be 'corpora', 'parent' or 'both', got {self.replay_source!r}")
        if self.replay_source != "corpora" and self.generated_windows < 1:
            raise ValueError(f"replay_source {self.replay_source!r} needs generated_windows >= 1")
        if self.key_init not in ("data", "random"):
            raise ValueError(f"key_init must be 'data' or 'random', got {self.key_init!r}")
        if self.distill_on not in ("old", "all"):
            raise ValueError(f"distill_on must be 'old' or 'all', got {self.distill_on!r}")
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        protection = self.replay_fraction > 0 or self.distill_weight > 0
        if s in _GROWING and self.new_experts == 0:
            raise ValueError(f"strategy {s!r} grows the pool: new_experts must be > 0")
        if s in ("naive", "grow_freeze") and protection:
            hint = "replay" if s == "naive" else "grow_freeze_protect"
            raise ValueError(f"strategy {s!r} has no protection: replay_fraction and distill_weight must be 0 "
                             f"(use {hint!r})")
        if s == "replay" and self.replay_fraction == 0:
            raise ValueError("strategy 'replay' needs replay_fraction > 0")
        if s == "grow_freeze_protect" and not protection:
            raise ValueError("strategy 'grow_freeze_protect' needs replay_fraction > 0 and/or distill_weight > 0")
        if self.distill_weight > 0 and self.distill_on == "old" and self.replay_fraction == 0:
            raise ValueError("distillation on old text (distill_on='old') needs replay_fraction > 0 "
                             "to bring old windows into the batches; or set distill_on='all'")
        if s == "sparse_finetune" and self.sparse_top_experts == 0:
            raise ValueError("strategy 'sparse_finetune' needs sparse_top_experts >= 1")
        if s != "sparse_finetune" and self.sparse_top_experts:
            raise ValueError(f"sparse_top_experts applies to 'sparse_finetune' only, not {s!r}")

    @property
    def dense_trains(self) -> bool:
        return self.strategy in ("naive", "replay") if self.train_dense is None else self.train_dense
