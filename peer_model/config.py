"""Model configuration: one dataclass per component, serialisable to and from JSON."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


@dataclass
class PEERConfig:
    """Shape of one PEER layer (He 2024, "Mixture of A Million Experts").

    ``num_experts`` is the *initial* pool size and must be a perfect square (a √N × √N product-key
    grid); the pool can grow later, see :mod:`peer_model.pool`.
    """

    num_experts: int = 1024 * 1024
    heads: int = 8
    top_k: int = 16
    d_key: int = 128  # full query size; each product-key half has d_key / 2
    query_batchnorm: bool = True
    activation: str = "gelu"  # "gelu" or "relu": sigma in e_i(x) = sigma(u_i . x) v_i

    def __post_init__(self) -> None:
        side = math.isqrt(self.num_experts)
        if side * side != self.num_experts:
            raise ValueError(f"num_experts must be a perfect square, got {self.num_experts}")
        if self.top_k > side:
            raise ValueError(f"top_k ({self.top_k}) must not exceed sqrt(num_experts) ({side})")
        if self.d_key % 2:
            raise ValueError(f"d_key must be even, got {self.d_key}")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {self.activation!r}")

    @property
    def sub_keys(self) -> int:
        return math.isqrt(self.num_experts)


@dataclass
class ModelConfig:
    """Decoder-only transformer; PEER replaces the feed-forward block in ``peer_layers``."""

    vocab_size: int = 259  # 256 bytes + BOS, EOS, PAD (see tokenizer.py)
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    d_ff: int = 1024  # hidden size of the dense feed-forward blocks
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    peer_layers: list[int] | None = None  # None: the middle block only, as in the paper
    peer: PEERConfig = field(default_factory=PEERConfig)

    def __post_init__(self) -> None:
        if isinstance(self.peer, dict):
            self.peer = PEERConfig(**self.peer)
        if self.peer_layers is None:
            self.peer_layers = [self.n_layers // 2]
        self.peer_layers = sorted(set(int(i) for i in self.peer_layers))
        bad = [i for i in self.peer_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"peer_layers {bad} out of range for n_layers={self.n_layers}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("the attention head size must be even for RoPE")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)
