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


FFW_KINDS = ("peer", "dense", "swiglu", "moe", "switch", "expert_choice", "pkm")
ATTENTION_KINDS = ("mha", "switchhead")


@dataclass
class MoEConfig:
    """Coarse-grained mixtures of MLP experts (``ffw`` = "moe", "switch" or "expert_choice").

    moe: noisy top-k gating with the importance and load losses (Shazeer et al. 2017);
    switch: top-1 routing with a capacity, the load-balancing loss (Fedus et al. 2021) and the router
    z-loss (Zoph et al. 2022); expert_choice: each expert takes its top tokens (Zhou et al. 2022).
    """

    num_experts: int = 8
    d_expert: int | None = None  # hidden size of each expert MLP; None: the model's d_ff
    top_k: int = 2  # moe only
    capacity_factor: float = 1.25  # switch: tokens per expert = factor · T / E; expert_choice: likewise
    noisy_gating: bool = True  # moe only
    balance_weight: float = 0.01  # weight of the importance + load (moe) or load-balancing (switch) loss
    z_loss_weight: float = 1e-3  # switch: router z-loss weight

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need num_experts >= 1 and 1 <= top_k <= num_experts, got {self.num_experts}, "
                             f"{self.top_k}")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")


@dataclass
class PKMConfig:
    """Product-key memory (Lample et al. 2019): value vectors retrieved by product keys."""

    num_memories: int = 1024 * 1024  # a perfect square
    heads: int = 8
    top_k: int = 32
    d_key: int = 128  # full query size; each product-key half has d_key / 2
    query_batchnorm: bool = True

    def __post_init__(self) -> None:
        side = math.isqrt(self.num_memories)
        if side * side != self.num_memories or not 1 <= self.top_k <= side or self.d_key % 2:
            raise ValueError("num_memories must be a square, 1 <= top_k <= sqrt(num_memories), d_key even")


@dataclass
class SwitchHeadConfig:
    """SwitchHead attention (Csordás et al. 2024): few heads whose value and output projections are
    mixtures of ``num_experts`` experts, ``top_k`` selected per token and head by a sigmoid."""

    n_heads: int = 2
    head_dim: int | None = None  # None: d_model // n_heads
    num_experts: int = 4
    top_k: int = 2

    def __post_init__(self) -> None:
        if self.n_heads < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError("need n_heads >= 1 and 1 <= top_k <= num_experts")


@dataclass
class ModelConfig:
    """Decoder-only transformer; the blocks in ``peer_layers`` use the ``ffw`` feed-forward (PEER by
    default; a baseline from :mod:`peer_model.baselines` otherwise), the other blocks a dense GELU MLP."""

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
    ffw: str = "peer"  # the feed-forward of the peer_layers blocks: one of FFW_KINDS
    moe: MoEConfig = field(default_factory=MoEConfig)
    pkm: PKMConfig = field(default_factory=PKMConfig)
    attention: str = "mha"  # every block: "mha" or "switchhead"
    switchhead: SwitchHeadConfig = field(default_factory=SwitchHeadConfig)

    def __post_init__(self) -> None:
        for name, cls in (("peer", PEERConfig), ("moe", MoEConfig), ("pkm", PKMConfig),
                          ("switchhead", SwitchHeadConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        if self.ffw not in FFW_KINDS:
            raise ValueError(f"ffw must be one of {', '.join(FFW_KINDS)}, got {self.ffw!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
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
