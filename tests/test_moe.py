"""The MoE baselines (noisy top-k, Switch, expert choice) against brute-force references and their losses."""
import math

import pytest
import torch

from peer_model.baselines.moe import ExpertChoiceMoE, NoisyTopKMoE, SwitchMoE
from peer_model.config import ModelConfig, MoEConfig
from peer_model.model import PEERTransformer

D, D_FF, E = 16, 24, 4
KINDS = [NoisyTopKMoE, SwitchMoE, ExpertChoiceMoE]


def make(cls, seed=0, scale=True, **options):
    """A layer with weights large enough that outputs are O(1) and router logits rarely near-tie."""
    torch.manual_seed(seed)
    layer = cls(D, D_FF, MoEConfig(**{"num_experts": E, **options}))
    if scale:
        with torch.no_grad():
            layer.w_up.normal_(std=0.3)
            layer.w_down.normal_(std=0.3)
            layer.router.weight.normal_(std=1.0)
    return layer


def expert(layer, e, x_t):
    """Expert e on one token, by explicit matmuls."""
    return torch.nn.functional.gelu(x_t @ layer.w_up[e]) @ layer.w_down[e]


@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize("shape", [(2, 5, D), (7, D), (1, 1, D)])
def test_shape_preserved(cls, shape):
    layer = make(cls)
    for train in (True, False):
        layer.train(train)
        assert layer(torch.randn(shape)).shape == shape


@pytest.mark.parametrize("cls", KINDS)
def test_gradients_reach_router_and_experts(cls):
    layer = make(cls, d_expert=8)
    assert layer.w_up.shape == (E, D, 8) and layer.w_down.shape == (E, 8, D)
    out = layer(torch.randn(3, 6, D))
    loss = out.sum() + (layer.aux_loss if layer.aux_loss is not None else 0)
    loss.backward()
    params = [layer.router.weight, layer.w_up, layer.w_down]
    if cls is NoisyTopKMoE:
        params.append(layer.noise.weight)
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_noisy_top_k_matches_brute_force_in_eval():
    layer = make(NoisyTopKMoE, top_k=2).eval()
    x = torch.randn(2, 9, D)
    out = layer(x)
    layer.requires_grad_(False)
    ref = torch.zeros_like(x.reshape(-1, D))
    for t, x_t in enumerate(x.reshape(-1, D)):
        logits = [float(x_t @ layer.router.weight[e]) for e in range(E)]
        top = sorted(range(E), key=lambda e: -logits[e])[:2]
        gates = torch.softmax(torch.tensor([logits[e] for e in top]), dim=0)
        ref[t] = sum(g * expert(layer, e, x_t) for g, e in zip(gates, top))
    torch.testing.assert_close(out, ref.view_as(x), atol=1e-5, rtol=0)
    assert layer.aux_loss is None


def test_switch_matches_brute_force_without_drops():
    layer = make(SwitchMoE, capacity_factor=float(E)).eval()  # capacity = T: nothing can drop
    x = torch.randn(3, 7, D)
    out = layer(x)
    layer.requires_grad_(False)
    ref = torch.zeros_like(x.reshape(-1, D))
    for t, x_t in enumerate(x.reshape(-1, D)):
        probs = torch.softmax(torch.stack([x_t @ layer.router.weight[e] for e in range(E)]), dim=0)
        e = int(probs.argmax())
        ref[t] = probs[e] * expert(layer, e, x_t)
    torch.testing.assert_close(out, ref.view_as(x), atol=1e-5, rtol=0)
    assert layer.last_stats["dropped_fraction"] == 0.0


@pytest.mark.parametrize("num_tokens,capacity_factor", [(13, 1.25), (8, 2.0), (1, 1.25)])
def test_expert_choice_matches_brute_force(num_tokens, capacity_factor):
    layer = make(ExpertChoiceMoE, capacity_factor=capacity_factor)
    x = torch.randn(num_tokens, D)
    out = layer(x)
    c = min(num_tokens, math.ceil(capacity_factor * num_tokens / E))
    layer.requires_grad_(False)
    scores = torch.softmax(torch.stack([x @ layer.router.weight[e] for e in range(E)], dim=1), dim=1)
    ref = torch.zeros_like(x)
    for e in range(E):
        chosen = sorted(range(num_tokens), key=lambda t: -float(scores[t, e]))[:c]
        for t in chosen:
            ref[t] += scores[t, e] * expert(layer, e, x[t])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    if num_tokens == 1:  # a single decoded token: every expert processes it
        assert c == 1 and layer.last_stats["experts_per_token"] == E


def test_switch_capacity_drops_tokens_past_capacity_in_order():
    layer = make(SwitchMoE, capacity_factor=0.5)
    T = 10
    capacity = math.ceil(0.5 * T / E)  # 2
    x = torch.randn(T, D)
    x[:, 0] = 1.0
    with torch.no_grad():  # every token prefers expert 0
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0
    out = layer(x)
    nonzero = out.abs().sum(-1) > 0
    assert nonzero.tolist() == [True] * capacity + [False] * (T - capacity)
    assert torch.equal(out[capacity:], torch.zeros_like(out[capacity:]))
    assert layer.last_stats["dropped_fraction"] == pytest.approx((T - capacity) / T)
    # f counts tokens before dropping: f = (1, 0, 0, 0), so the balance term is E · P_0
    p0 = math.exp(10.0) / (math.exp(10.0) + E - 1)
    z = math.log(math.exp(10.0) + E - 1) ** 2
    cfg = layer.config
    assert layer.aux_loss.item() == pytest.approx(cfg.balance_weight * E * p0 + cfg.z_loss_weight * z, rel=1e-5)


def test_switch_losses_match_hand_computation():
    bw, zw = 0.3, 0.7
    # round-robin tokens with near-uniform probabilities: f uniform, so E · Σ f_i P_i = Σ P_i = 1
    layer = make(SwitchMoE, balance_weight=bw, z_loss_weight=zw, capacity_factor=4.0)
    eps = 0.01
    x = torch.zeros(8, D)
    x[torch.arange(8), torch.arange(8) % E] = 1.0
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = eps * torch.eye(E)
    layer(x)
    z = math.log(math.exp(eps) + E - 1) ** 2
    assert layer.aux_loss.item() == pytest.approx(bw * 1.0 + zw * z, rel=1e-5)
    # a random router: f, P and the z-loss by hand
    x = torch.randn(11, D)
    layer(x)
    layer.requires_grad_(False)
    logits = [[float(x_t @ layer.router.weight[e]) for e in range(E)] for x_t in x]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    f = [sum(1 for row in probs if max(range(E), key=lambda i: row[i]) == e) / 11 for e in range(E)]
    P = [sum(row[e] for row in probs) / 11 for e in range(E)]
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 11
    expected = bw * E * sum(fi * pi for fi, pi in zip(f, P)) + zw * z
    assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-5)


def test_noisy_top_k_balance_loss():
    torch.manual_seed(0)
    layer = NoisyTopKMoE(D, D_FF, MoEConfig(num_experts=2, top_k=1, noisy_gating=False, balance_weight=0.5))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :2] = 10.0 * torch.eye(2)
    x = torch.zeros(2, D)
    x[0, 0] = x[1, 1] = 1.0  # token 0 prefers expert 0, token 1 expert 1: importance and load uniform
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(0.0, abs=1e-6)
    x[1] = x[0]  # both prefer expert 0: importance = load = (2, 0), CV² = 1 each
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(0.5 * 2.0, rel=1e-5)


def test_noisy_load_estimator_matches_monte_carlo():
    """P(expert in top k when its noise is redrawn, the others' noisy logits fixed), by sampling."""
    torch.manual_seed(0)
    k, n = 2, 20000
    layer = NoisyTopKMoE(D, D_FF, MoEConfig(num_experts=E, top_k=k))
    clean = torch.tensor([[0.5, 0.1, -0.2, 0.3]])
    std = torch.tensor([[0.4, 0.6, 0.5, 0.3]])
    noisy = clean + torch.randn(1, E) * std
    top_values, top_ids = noisy.topk(k + 1, dim=-1)
    prob = layer._prob_in_top_k(clean, noisy, std, top_values, top_ids[:, :k])[0]
    for e in range(E):
        others = torch.cat([noisy[0, :e], noisy[0, e + 1:]]).expand(n, E - 1)
        redrawn = clean[0, e] + torch.randn(n) * std[0, e]
        in_top = (others > redrawn.unsqueeze(1)).sum(1) < k
        assert float(prob[e]) == pytest.approx(float(in_top.float().mean()), abs=0.015)


def test_expert_choice_balanced_and_no_aux_loss():
    layer = make(ExpertChoiceMoE, capacity_factor=1.5)
    seen = []
    mix = layer._mix
    layer._mix = lambda x, ids, w, counts: (seen.append((ids.clone(), list(counts))), mix(x, ids, w, counts))[1]
    x = torch.randn(2, 10, D)
    layer(x)
    c = math.ceil(1.5 * 20 / E)
    ids, counts = seen[0]
    assert counts == [c] * E and ids.numel() == E * c
    for e in range(E):  # an expert picks distinct tokens
        assert ids[e * c:(e + 1) * c].unique().numel() == c
    assert layer.last_stats["tokens_per_expert"] == c
    assert layer.aux_loss is None


@pytest.mark.parametrize("cls", KINDS)
def test_eval_mode(cls):
    layer = make(cls, scale=False)
    x = torch.randn(2, 6, D)
    layer.train()
    layer(x)
    assert (layer.aux_loss is None) == (cls is ExpertChoiceMoE)
    if cls is not ExpertChoiceMoE:
        assert layer.aux_loss.dim() == 0
    layer.eval()
    first = layer(x)
    assert layer.aux_loss is None
    assert torch.equal(first, layer(x))


def test_noisy_gating_is_random_in_training_only():
    layer = make(NoisyTopKMoE)
    x = torch.randn(4, 8, D)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kind", ["moe", "switch", "expert_choice"])
def test_model_end_to_end(kind):
    torch.manual_seed(0)
    model = PEERTransformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32, ffw=kind,
                                        moe=MoEConfig(num_experts=4, top_k=2)))
    model.train()
    logits = model(torch.randint(0, 259, (2, 16)))
    assert logits.shape == (2, 16, 259)
    aux = model.aux_loss()
    if kind == "expert_choice":
        assert aux is None
    else:
        assert aux.dim() == 0 and torch.isfinite(aux)
        (logits.float().logsumexp(-1).mean() + aux).backward()
