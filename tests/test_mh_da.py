"""MH-MoE token splitting and DA-MoE dynamic k, for the top-k MoE and for PEER, against plain loops over
sub-tokens and tokens; the attention importance; cached decoding; the average FLOP count."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from peer_model.attention import self_attention_share
from peer_model.baselines.moe import NoisyTopKMoE
from peer_model.config import ModelConfig, MoEConfig, PEERConfig
from peer_model.dynamic_k import DynamicK
from peer_model.flops import count_flops
from peer_model.model import PEERTransformer
from peer_model.peer import PEER

D, D_FF, E = 16, 24, 4


def moe_layer(seed=0, **options) -> NoisyTopKMoE:
    torch.manual_seed(seed)
    layer = NoisyTopKMoE(D, D_FF, MoEConfig(**{"num_experts": E, "top_k": 2, **options}))
    with torch.no_grad():  # outputs O(1), router logits rarely near-tied
        layer.w_up.normal_(std=0.3)
        layer.w_down.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)
    return layer.eval().requires_grad_(False)


def moe_expert(layer, e, x_t):
    return F.gelu(x_t @ layer.w_up[e]) @ layer.w_down[e]


def top_k_mixture(layer, x_t, k):
    logits = [float(x_t @ layer.router.weight[e]) for e in range(E)]
    top = sorted(range(E), key=lambda e: -logits[e])[:k]
    gates = torch.softmax(torch.tensor([logits[e] for e in top]), dim=0)
    return sum(g * moe_expert(layer, e, x_t) for g, e in zip(gates, top))


def hand_k(importance, scale, max_k):
    """DA-MoE's allocation, one token at a time."""
    return [min(max_k, max(1, round(float(scale) * float(s)))) for s in importance]


def test_mh_moe_matches_a_loop_over_sub_tokens():
    h = 4
    layer = moe_layer(sub_tokens=h)
    assert layer.w_up.shape == (E, D // h, D_FF) and layer.router.weight.shape == (E, D // h)
    x = torch.randn(2, 5, D)
    out = layer(x)
    ref = []
    for x_t in x.reshape(-1, D):
        pieces = (layer.split.weight @ x_t).split(D // h)  # the sub-tokens
        merged = torch.cat([top_k_mixture(layer, s, 2) for s in pieces])
        ref.append(layer.merge.weight @ merged)
    torch.testing.assert_close(out, torch.stack(ref).view_as(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("training", [False, True])
def test_da_moe_matches_a_loop_with_each_tokens_k(training):
    layer = moe_layer(dynamic_k=True, max_k=3, noisy_gating=False)
    layer.allocator.scale.fill_(1.6)
    x = torch.randn(11, D)
    importance = torch.rand(11) * 3
    layer.train(training)
    out = layer(x, importance=importance)
    scale = float(layer.allocator.calibrate(importance)) if training else 1.6
    ks = hand_k(importance, scale, 3)
    assert layer.allocator.last_k.tolist() == ks and len(set(ks)) > 1
    ref = torch.stack([top_k_mixture(layer, x_t, k) for x_t, k in zip(x, ks)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert layer.last_stats["experts_per_token"] == pytest.approx(sum(ks) / len(ks))
    if training:  # the batch's mean k is the budget; the running scale moved a tenth of the way to its c
        assert sum(ks) / len(ks) == pytest.approx(2, abs=1 / 11)
        assert float(layer.allocator.scale) == pytest.approx(1.6 + 0.1 * (scale - 1.6))


def test_da_moe_load_estimator_with_equal_ks_is_the_fixed_one():
    layer = moe_layer(dynamic_k=True, max_k=3)
    clean, std = torch.randn(6, E), torch.rand(6, E) + 0.1
    noisy = clean + torch.randn(6, E) * std
    top_values, top_ids = noisy.topk(E, dim=-1)
    fixed = layer._prob_in_top_k(clean, noisy, std, top_values[:, :3], top_ids[:, :2])
    per_token = layer._prob_in_top_k(clean, noisy, std, top_values, top_ids[:, :3], torch.full((6,), 2))
    torch.testing.assert_close(per_token, fixed)
    everything = layer._prob_in_top_k(clean, noisy, std, top_values, top_ids, torch.full((6,), E))
    assert torch.equal(everything, torch.ones_like(everything))  # a token using every expert keeps them


def test_da_moe_trains_and_needs_importance():
    layer = moe_layer(dynamic_k=True).train().requires_grad_(True)
    out = layer(torch.randn(3, 4, D), importance=torch.rand(3, 4))
    (out.sum() + layer.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.noise.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="importance"):
        layer(torch.randn(2, D))


# ---- PEER ---------------------------------------------------------------------------------------


def peer_layer(seed=0, **options) -> PEER:
    torch.manual_seed(seed)
    layer = PEER(D, PEERConfig(**{"num_experts": 8 * 8, "heads": 4, "top_k": 3, "d_key": 8, **options}))
    with torch.no_grad():
        layer.expert_up.normal_(std=0.5)
    return layer.eval()


def brute_force_head(layer, query, inputs, k):
    """One head by brute force: score every expert's full key, softmax the best k, mix their experts."""
    keys = torch.stack([torch.cat([layer.sub_keys1[i], layer.sub_keys2[j]])
                        for i in range(layer.grid.rows) for j in range(layer.grid.cols)])  # row-major ids
    scores = keys @ query
    top = scores.topk(k)
    gates = torch.softmax(top.values, dim=0)
    return sum(g * F.gelu(layer.expert_down[e] @ inputs) * layer.expert_up[e] for g, e in zip(gates, top.indices))


def test_peer_ids_are_row_major_cells():
    layer = peer_layer()
    assert layer.grid.cell_to_id(torch.tensor([2]), torch.tensor([5])).item() == 2 * 8 + 5


def test_mh_peer_matches_a_loop_over_head_slices():
    h, k = 4, 3
    layer = peer_layer(head_slices=True)
    assert layer.expert_down.shape == (64, D // h) and layer.query.weight.shape == (8, D // h)
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        out = layer(x)
        ref = []
        for x_t in x.reshape(-1, D):
            pieces = (layer.split.weight @ x_t).split(D // h)
            merged = torch.cat([brute_force_head(layer, layer.query_norm(layer.query(s).unsqueeze(0))[0], s, k)
                                for s in pieces])
            ref.append(layer.merge.weight @ merged)
    torch.testing.assert_close(out, torch.stack(ref).view_as(x), atol=1e-5, rtol=0)


def test_da_peer_matches_a_loop_with_each_tokens_k():
    layer = peer_layer(dynamic_k=True, max_k=6)
    layer.allocator.scale.fill_(3.75)
    x, importance = torch.randn(7, D), torch.rand(7) * 2
    with torch.no_grad():
        out = layer(x, importance=importance)
        ks = hand_k(importance, 3.75, 6)
        assert len(set(ks)) > 1
        ref = []
        for x_t, k in zip(x, ks):
            queries = layer.query_norm(layer.query(x_t).unsqueeze(0))[0].view(4, 8)
            ref.append(sum(brute_force_head(layer, q, x_t, k) for q in queries))
    torch.testing.assert_close(out, torch.stack(ref), atol=1e-5, rtol=0)


def test_da_peer_counts_and_trains_only_the_kept_experts():
    layer = peer_layer(dynamic_k=True, max_k=6).train()
    layer.track_usage = True
    x, importance = torch.randn(9, D), torch.rand(9) * 2
    layer(x, importance=importance).sum().backward()
    k = layer.allocator.last_k
    ids, counted = layer.last_usage
    assert counted.sum().item() == 4 * k.sum().item() == layer.usage_counts.sum().item()
    kept_ids = set(ids[counted.bool()].tolist())
    assert set(layer.expert_up.grad.coalesce().indices()[0].tolist()) == kept_ids
    layer.eval()
    with torch.no_grad():  # the fast path against the plain one, dropped slots included
        fast = layer(x, importance=importance)
        layer.reference = True
        torch.testing.assert_close(layer(x, importance=importance), fast, atol=1e-5, rtol=1e-5)


def test_allocation_clamps_to_one_and_max_k():
    allocator = DynamicK(4, 6).eval()  # the scale starts at the mean k: importance 1 gets 4 experts
    k = allocator(torch.tensor([0.0, 0.1, 1.0, 1.3, 10.0]))
    assert k.tolist() == [1, 1, 4, 5, 6]


@pytest.mark.parametrize("mean_k,max_k", [(2, 4), (16, 32), (3, 3), (1, 4)])
def test_calibrated_scale_is_the_smallest_that_spends_the_budget(mean_k, max_k):
    torch.manual_seed(0)
    allocator = DynamicK(mean_k, max_k)
    importance = torch.randn(3000).exp() ** 2  # heavy-tailed, as attention shares are
    importance[:100] = 0.0
    c = allocator.calibrate(importance)
    reachable = torch.where(importance > 0, max_k, 1).float().mean()  # zero importance: one expert at any c
    assert allocator.allocate(importance, c).float().mean() >= min(mean_k, reachable) - 1e-6
    below = allocator.allocate(importance, c * 0.97).float().mean()
    assert below < mean_k or mean_k == 1 or mean_k == max_k
    assert float(allocator.calibrate(torch.zeros(5))) == mean_k  # nothing to allocate by: one expert each


# ---- importance, the model, cached decoding -----------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_self_attention_share_is_the_diagonal_of_the_attention_matrix(kv_heads):
    torch.manual_seed(0)
    B, H, T, hd = 2, 4, 6, 8
    q, k = torch.randn(B, H, T, hd), torch.randn(B, kv_heads, T, hd)
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    share = self_attention_share(q, k, visible, torch.arange(T))
    keys = k.repeat_interleave(H // kv_heads, dim=1)
    probs = torch.softmax((q @ keys.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~visible, float("-inf")), -1)
    expected = probs.diagonal(dim1=-2, dim2=-1).mean(1) * torch.arange(1, T + 1)
    torch.testing.assert_close(share, expected)
    assert torch.allclose(share[:, 0], torch.ones(B))  # the first token sees only itself


OPTIONS = {
    "mh-moe": dict(ffw="moe", moe=MoEConfig(num_experts=4, top_k=2, sub_tokens=4)),
    "da-moe": dict(ffw="moe", moe=MoEConfig(num_experts=4, top_k=2, dynamic_k=True)),
    "mh-peer": dict(ffw="peer", peer=PEERConfig(num_experts=16 * 16, heads=4, top_k=4, d_key=16, head_slices=True)),
    "da-peer": dict(ffw="peer", peer=PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16, dynamic_k=True)),
}


def small_model(option: str, **kwargs) -> PEERTransformer:
    torch.manual_seed(0)
    model = PEERTransformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
                                        **OPTIONS[option], **kwargs))
    model.train()
    for _ in range(2):  # a few training forwards: BatchNorm and the importance running means move
        model(torch.randint(0, 256, (2, 16)))
    return model.eval()


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_cached_decoding_equals_a_full_forward(option):
    model = small_model(option)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2)
        steps = [model(tokens[:, :5], cache)] + [model(tokens[:, t : t + 1], cache) for t in range(5, 10)]
        cache.lengths = torch.full((2,), 10)  # the batch engine's ragged decode, one token per row
        steps += [model(tokens[:, t : t + 1], cache) for t in range(10, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_model_trains_with_the_option_and_parallel_branch(option):
    for branch in ("replace", "parallel"):
        model = small_model(option, peer_branch=branch).train()
        logits = model(torch.randint(0, 256, (2, 16)))
        aux = model.aux_loss()
        (logits.logsumexp(-1).mean() + (aux if aux is not None else 0)).backward()
        layer = model.expert_layers()[1]
        assert all(p.grad is not None for p in layer.parameters() if p.requires_grad and p.dim() > 1)


def test_options_are_validated():
    with pytest.raises(ValueError, match="dynamic_k"):
        PEERConfig(num_experts=64, top_k=4, max_k=6)
    with pytest.raises(ValueError, match="max_k"):
        PEERConfig(num_experts=64, top_k=4, dynamic_k=True, max_k=9)
    with pytest.raises(ValueError, match="choose one"):
        MoEConfig(num_experts=4, sub_tokens=2, dynamic_k=True)
    with pytest.raises(ValueError, match="sub_tokens"):
        ModelConfig(d_model=32, n_heads=2, ffw="switch", moe=MoEConfig(sub_tokens=2))
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=36, n_heads=2, peer=PEERConfig(num_experts=64, heads=8, top_k=4, head_slices=True))
    assert PEERConfig(num_experts=64, top_k=4, dynamic_k=True).retrieved_k == 8  # 2 · top_k, at most √N


# ---- FLOPs: the average against a hand count ----------------------------------------------------

B, T = 2, 16


def measured(model: PEERTransformer) -> float:
    """torch's count of the matrix products of an eval forward, per token."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 256, (B, T)))
    return counter.get_total_flops() / (B * T)


def flop_model(option: str) -> PEERTransformer:
    torch.manual_seed(0)
    return PEERTransformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=T,
                                       **OPTIONS[option])).eval()


def test_flops_by_hand():
    d, d_ff, ctx, n, half = 32, 64, (T + 1) / 2, 16 * 16, 8
    dense_block = 2 * 4 * d * d + 4 * ctx * d + 2 * 2 * d * d_ff
    lm_head = 2 * d * 259
    attention = 2 * 4 * d * d + 4 * ctx * d
    hand = {  # the expert block's feed-forward (forward multiply-adds × 2)
        "mh-moe": 2 * (2 * d * d + d * 4 + 2 * 2 * d * d_ff),  # split + merge, 4 routers of 8 · 4, top-2 of 8 → 64
        "da-moe": 2 * (d * 4 + 2 * 2 * d * d_ff) + 2 * T * d,  # the mean k = 2, and the importance q·kᵀ
        "mh-peer": 2 * (2 * d * d + 4 * 16 * (d // 4) + 4 * 2 * 16 * half + 4 * 4 * 2 * (d // 4)) + 4 * 4**2,
        "da-peer": 2 * (2 * 16 * d + 2 * 2 * 16 * half + 2 * 4 * 2 * d) + 2 * 8**2 + 2 * T * d,  # ranks max_k = 8
    }
    for option, ffw in hand.items():
        count = count_flops(flop_model(option).config, T)
        assert count.forward_per_token == pytest.approx(dense_block + attention + ffw + lm_head, rel=1e-12), option


@pytest.mark.parametrize("option", ["mh-moe", "da-moe"])
def test_moe_counts_are_torchs_matrix_products_at_the_realised_mean_k(option):
    """torch counts the experts that ran; the counter counts the configured mean k: they differ by
    exactly (realised mean − top_k) experts per token."""
    model = flop_model(option)
    counted = count_flops(model.config, T).forward_per_token - 2 * 4 * (T + 1) / 2 * 32
    got = measured(model)
    layer = model.expert_layers()[1]
    realised = 2 if layer.allocator is None else layer.allocator.last_k.float().mean().item()
    assert got == pytest.approx(counted + (realised - 2) * 2 * 2 * 32 * 64, rel=1e-9)


@pytest.mark.parametrize("option", ["mh-peer", "da-peer"])
def test_peer_counts_are_torchs_matrix_products_plus_its_experts(option):
    model = flop_model(option)
    peer = model.config.peer
    d_expert = 32 // peer.heads if peer.head_slices else 32
    experts_and_sums = 2 * peer.heads * peer.top_k * 2 * d_expert + peer.heads * peer.retrieved_k**2
    counted = count_flops(model.config, T).forward_per_token - 2 * 4 * (T + 1) / 2 * 32 - experts_and_sums
    assert counted == pytest.approx(measured(model), rel=1e-9)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_checkpoint_round_trip_keeps_the_function(option, tmp_path):
    """The importance running mean is saved with the weights (a persistent buffer)."""
    from peer_model.checkpoint import load_checkpoint, save_checkpoint

    model = small_model(option)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)
