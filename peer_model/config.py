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
    # MH-MoE token splitting (Wu et al. 2024): each head reads its own d/heads slice of a projected x and
    # retrieves d/heads-dimensional experts; a merge projection joins the slices (see peer.py)
    head_slices: bool = False
    # DA-MoE (Aghdam et al. 2024): a per-token number of experts, top_k on average, at most max_k, from
    # the token's importance in the block's attention (see dynamic_k.py)
    dynamic_k: bool = False
    max_k: int | None = None  # dynamic_k only; None: 2 · top_k (at most sqrt(num_experts))

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
        _check_dynamic_k(self.dynamic_k, self.top_k, self.max_k, side, self.head_slices)

    @property
    def sub_keys(self) -> int:
        return math.isqrt(self.num_experts)

    @property
    def retrieved_k(self) -> int:
        """Experts retrieved per head: ``top_k``, or with ``dynamic_k`` the most any token may use."""
        return _max_k(self.dynamic_k, self.top_k, self.max_k, self.sub_keys)


def _max_k(dynamic: bool, top_k: int, max_k: int | None, limit: int) -> int:
    if not dynamic:
        return top_k
    return max_k if max_k is not None else min(2 * top_k, limit)


def _check_dynamic_k(dynamic: bool, top_k: int, max_k: int | None, limit: int, split: bool) -> None:
    if max_k is not None and not dynamic:
        raise ValueError("max_k is for dynamic_k only")
    if dynamic and not top_k <= _max_k(dynamic, top_k, max_k, limit) <= limit:
        raise ValueError(f"need top_k <= max_k <= {limit}, got top_k {top_k}, max_k {max_k}")
    if dynamic and split:
        raise ValueError("dynamic_k and token splitting are separate options; choose one")


FFW_KINDS = ("peer", "dense", "swiglu", "moe", "switch", "expert_choice", "pkm")
ATTENTION_KINDS = ("mha", "switchhead")
MLP_KINDS = ("gelu", "gelu_tanh", "swiglu")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
BASE_TRAINS = ("all", "norms", "none")
PARAMETERIZATIONS = ("standard", "mssp")


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
    # moe only: MH-MoE (Wu et al. 2024) splits each token into sub_tokens slices of d / sub_tokens, each
    # routed on its own to experts of that input size, merged back by a projection; 1: no splitting
    sub_tokens: int = 1
    # moe only: DA-MoE (Aghdam et al. 2024) dynamic k: top_k experts per token on average, at most max_k
    dynamic_k: bool = False
    max_k: int | None = None  # dynamic_k only; None: 2 · top_k (at most num_experts)

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need num_experts >= 1 and 1 <= top_k <= num_experts, got {self.num_experts}, "
                             f"{self.top_k}")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if self.sub_tokens < 1:
            raise ValueError(f"sub_tokens must be >= 1, got {self.sub_tokens}")
        _check_dynamic_k(self.dynamic_k, self.top_k, self.max_k, self.num_experts, self.sub_tokens > 1)

    @property
    def retrieved_k(self) -> int:
        """Experts ranked per token: ``top_k``, or with ``dynamic_k`` the most any token may use."""
        return _max_k(self.dynamic_k, self.top_k, self.max_k, self.num_experts)


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
    # Architecture options of pretrained families (peer_model/hf): the defaults are this project's own model.
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads; None: n_heads
    head_dim: int | None = None  # None: d_model // n_heads (Qwen3 sets it larger)
    norm: str = "rmsnorm"  # or "layernorm" (with bias, GPT-2)
    positions: str = "rope"  # or "learned": a table of max_seq_len position embeddings (GPT-2)
    rope_style: str = "interleaved"  # rotated pairs (x[2i], x[2i+1]); "half": (x[i], x[i + hd/2]), HF's rotate_half
    rope_scaling: dict | None = None  # {"rope_type": linear | llama3 | yarn, "factor": ..., ...} as in HF configs
    attn_bias: bool = False  # biases of the query, key and value projections (Qwen2, GPT-2)
    attn_out_bias: bool = False  # bias of the output projection (GPT-2)
    qk_norm: bool = False  # RMSNorm of each head's query and key before RoPE (Qwen3)
    mlp: str = "gelu"  # the dense feed-forward blocks: "gelu", "gelu_tanh" (GPT-2) or "swiglu" (Llama family)
    mlp_bias: bool = False
    tie_embeddings: bool = True  # the output projection is the embedding table
    peer_branch: str = "replace"  # "replace": the expert layer is the block's feed-forward; "parallel": it is
    # added beside the block's dense feed-forward (a retrofit of a pretrained model, function-preserving)
    base_trains: str = "all"  # what trains outside the expert layers: "all", "norms" or "none" (a frozen base)
    hf_config: dict | None = None  # a pretrained model's own config.json (its family; written back by export)
    # "standard": fixed-std init, one learning rate per optimizer; "mssp": width-scaled init and per-group
    # learning-rate multipliers relative to a model of width mssp_base_width (see parameterization.py)
    parameterization: str = "standard"
    mssp_base_width: int = 128

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
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.attention_head_dim % 2:
            raise ValueError("the attention head size must be even for RoPE")
        for name, allowed in (("norm", ("rmsnorm", "layernorm")), ("positions", ("rope", "learned")),
                              ("rope_style", ("interleaved", "half")), ("mlp", MLP_KINDS),
                              ("peer_branch", ("replace", "parallel")), ("base_trains", BASE_TRAINS),
                              ("parameterization", PARAMETERIZATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.moe.sub_tokens > 1 and (self.ffw != "moe" or self.d_model % self.moe.sub_tokens):
            raise ValueError("moe.sub_tokens is for ffw 'moe' and must divide d_model")
        if self.moe.dynamic_k and self.ffw != "moe":
            raise ValueError("moe.dynamic_k is for ffw 'moe'")
        if self.peer.head_slices and self.d_model % self.peer.heads:
            raise ValueError(f"peer.head_slices needs d_model divisible by peer.heads ({self.peer.heads})")
        if self.mssp_base_width < 1:
            raise ValueError(f"mssp_base_width must be >= 1, got {self.mssp_base_width}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)
