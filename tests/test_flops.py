"""The FLOP counter against torch's own count of the matrix products a forward pass really runs."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from peer_model.config import ModelConfig, MoEConfig, PEERConfig
from peer_model.flops import count_flops
from peer_model.model import PEERTransformer

B, T = 2, 16


def base(peer: PEERConfig | None = None, **kwargs) -> ModelConfig:
    kwargs = {"n_heads": 2, **kwargs}
    return ModelConfig(d_model=32, n_layers=2, d_ff=64, max_seq_len=T, peer_layers=[1],
                       peer=peer or PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16), **kwargs)


def measured_matmul_flops_per_token(config: ModelConfig) -> float:
    """torch's FlopCounterMode on an eval forward: it counts the matrix products (the CPU attention kernel
    and PEER's gather-based experts are not among them)."""
    torch.manual_seed(0)
    model = PEERTransformer(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 256, (B, T)))
    return counter.get_total_flops() / (B * T)


def attention_scores(config: ModelConfig) -> float:
    return config.n_layers * 4 * (T + 1) / 2 * config.d_model


@pytest.mark.parametrize("kwargs", [
    dict(ffw="dense"), dict(ffw="swiglu"),
    dict(ffw="moe", moe=MoEConfig(num_experts=4, top_k=2)),
    dict(ffw="switch", moe=MoEConfig(num_experts=4, capacity_factor=4.0)),  # capacity for every token: no drops
    dict(ffw="expert_choice", moe=MoEConfig(num_experts=4, capacity_factor=2.0)),  # c = 2·32/4 = 16 per expert
])
def test_dense_and_moe_counts_equal_the_matrix_products_torch_runs(kwargs):
    config = base(**kwargs)
    counted = count_flops(config, T).forward_per_token - attention_scores(config)
    assert counted == pytest.approx(measured_matmul_flops_per_token(config), rel=1e-9)


def test_pretrained_family_options_count_the_matrix_products_torch_runs():
    """Grouped-query attention with a wider head, SwiGLU dense blocks, an untied head and a dense MLP
    beside the expert layer (a retrofit's parallel branch; the expert layer is a dense one here so that
    torch counts all of it)."""
    config = base(ffw="dense", n_heads=4, n_kv_heads=2, head_dim=16, mlp="swiglu", tie_embeddings=False,
                  peer_branch="parallel")
    scores = config.n_layers * 4 * (T + 1) / 2 * config.n_heads * config.attention_head_dim
    counted = count_flops(config, T).forward_per_token - scores
    assert counted == pytest.approx(measured_matmul_flops_per_token(config), rel=1e-9)


def test_peer_counts_the_query_and_sub_key_products_torch_runs_plus_its_experts():
    config = base(ffw="peer")
    peer = config.peer
    experts_and_sums = 2 * peer.heads * peer.top_k * 2 * config.d_model + peer.heads * peer.top_k**2
    counted = count_flops(config, T).forward_per_token - attention_scores(config) - experts_and_sums
    assert counted == pytest.approx(measured_matmul_flops_per_token(config), rel=1e-9)


def test_peer_costs_grow_with_the_square_root_of_the_pool_not_the_pool():
    small, big = (count_flops(base(peer=PEERConfig(num_experts=n, heads=2, top_k=4, d_key=16)))
                  for n in (64 * 64, 256 * 256))
    extra = big.breakdown["expert_ffw"] - small.breakdown["expert_ffw"]
    assert extra == 2 * 2 * (2 * 256 - 2 * 64) * 16 // 2  # heads · (rows + cols) · d_key / 2 multiply-adds
    assert big.train_per_token == 3 * big.forward_per_token
