"""Training loop, schedule, clipping, evaluation; frozen experts stay bit-identical."""
import math
import random

import pytest
import torch

from peer_model.config import ModelConfig, PEERConfig
from peer_model.model import PEERTransformer
from peer_model.optim import SparseRowAdam
from peer_model.tokenizer import BOS
from peer_model.train import (
    TokenData, TrainConfig, build_optimizers, clip_grad_norm, evaluate_bpb, lr_scale, train,
)


def tiny_model(seed: int = 0, num_experts: int = 16 * 16) -> PEERTransformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64, peer_layers=[1],
        peer=PEERConfig(num_experts=num_experts, heads=2, top_k=4, d_key=16),
    )
    return PEERTransformer(config)


ENGLISH_GRAMMAR = (
    ["the cat", "a dog", "my friend", "the old man"],
    ["sees", "likes", "finds", "wants"],
    ["the ball.", "a red box.", "some bread.", "the moon."],
)


def grammar_text(n_sentences: int, seed: int = 0, grammar=ENGLISH_GRAMMAR) -> str:
    """Sentences from a small random grammar (one choice per part): low entropy per byte, but not a
    fixed string."""
    rng = random.Random(seed)
    return " ".join(" ".join(rng.choice(part) for part in grammar) for _ in range(n_sentences))


def small_cfg(**overrides) -> TrainConfig:
    base = dict(steps=20, batch_size=8, seq_len=32, warmup_steps=5, eval_every=10, eval_batches=4,
                log_every=5, device="cpu")
    return TrainConfig(**{**base, **overrides})


DATA = TokenData.from_text(grammar_text(800, seed=0))
VAL = TokenData.from_text(grammar_text(100, seed=1))


# ---- config and schedule -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"steps": 0}, {"batch_size": 0}, {"seq_len": 0}, {"lr": -1.0}, {"expert_lr": -1e-3},
    {"weight_decay": -0.1}, {"betas": (0.9, 1.0)}, {"betas": (0.9,)}, {"warmup_steps": -1},
    {"min_lr_ratio": 1.5}, {"grad_clip": 0.0}, {"eval_every": 0}, {"eval_batches": 0},
    {"log_every": 0}, {"device": "no-such-device"},
])
def test_train_config_rejects_invalid_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=1100, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_scale(1, cfg) == pytest.approx(0.01)
    assert lr_scale(50, cfg) == pytest.approx(0.5)
    assert lr_scale(100, cfg) == pytest.approx(1.0)  # end of warm-up: the peak
    assert lr_scale(600, cfg) == pytest.approx(0.55)  # cosine midpoint: halfway to min_lr_ratio
    assert lr_scale(1100, cfg) == pytest.approx(0.1)  # last step
    decay = [lr_scale(s, cfg) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    no_warmup = TrainConfig(steps=10, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_scale(10, no_warmup) == pytest.approx(0.0, abs=1e-12)


# ---- data ----------------------------------------------------------------------------------------


def test_token_data_holds_utf8_bytes():
    data = TokenData.from_text("héllo")
    assert data.tokens.dtype == torch.uint8
    assert data.tokens.tolist() == list("héllo".encode("utf-8"))
    assert len(data) == 6
    assert len(TokenData.from_text("")) == 0


def test_sample_batch_windows_start_with_bos_and_are_shifted_by_one():
    data = TokenData(torch.arange(100))
    inputs, targets = data.sample_batch(6, 10, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (6, 10) and inputs.dtype == torch.int64
    assert bool((inputs[:, 0] == BOS).all())  # every window is a fresh context, as in generation
    assert torch.equal(targets[:, :-1] + 1, targets[:, 1:])  # consecutive ids
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert int(targets.max()) <= 99
    assert data.sample_batch(3, 100)[1].shape == (3, 100)  # the whole sequence is one window
    with pytest.raises(ValueError):
        data.sample_batch(1, 101)


def test_eval_windows_predict_every_token_exactly_once():
    data = TokenData(torch.arange(102))  # 10 windows of 10 (3 batches of 4) + a tail of 2
    batches = list(data.iter_eval_batches(batch_size=4, seq_len=10))
    assert [b[0].shape for b in batches] == [(4, 10), (4, 10), (2, 10), (1, 2)]
    targets = torch.cat([t.flatten() for _, t in batches])
    assert torch.equal(targets, torch.arange(102))
    assert all(bool((i[:, 0] == BOS).all()) and torch.equal(i[:, 1:], t[:, :-1]) for i, t in batches)
    assert len(list(data.iter_eval_batches(4, 10, max_batches=2))) == 2
    exact = TokenData(torch.arange(20))
    assert [b[0].shape for b in exact.iter_eval_batches(4, 10)] == [(2, 10)]


# ---- optimizers and clipping ---------------------------------------------------------------------


def test_build_optimizers_groups_every_trainable_parameter_once():
    model = tiny_model()
    model.embed.weight.requires_grad_(False)
    opts = build_optimizers(model, TrainConfig())
    layer = model.blocks[1].ffw
    decay, no_decay = (group["params"] for group in opts.dense.param_groups)
    assert isinstance(opts.experts, SparseRowAdam)
    assert opts.experts.param_groups[0]["params"] == [layer.expert_down, layer.expert_up]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay} == {
        "blocks.0.attn.qkv.weight", "blocks.0.attn.out.weight", "blocks.0.ffw.up.weight",
        "blocks.0.ffw.down.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.out.weight",
        "blocks.1.ffw.query.weight",
    }
    assert "blocks.1.ffw.sub_keys1" in {names[id(p)] for p in no_decay}
    grouped = [id(p) for group in (decay, no_decay, [layer.expert_down, layer.expert_up]) for p in group]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    opts.set_lr_scale(0.5)
    assert opts.dense.param_groups[0]["lr"] == pytest.approx(1.5e-3)
    assert opts.experts.param_groups[0]["lr"] == pytest.approx(5e-4)


def backward_once(model):
    inputs, targets = DATA.sample_batch(4, 32, torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    loss.backward()


def dense_norm(model) -> float:
    """Brute force: every gradient densified, one flat vector."""
    flat = [p.grad.to_dense().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.cat(flat).double().norm())


def test_clip_grad_norm_equals_a_dense_computation_and_clips_to_max_norm():
    model = tiny_model()
    backward_once(model)
    layer = model.blocks[1].ffw
    assert layer.expert_down.grad.is_sparse and layer.expert_up.grad.is_sparse
    expected = dense_norm(model)
    before = [p.grad.to_dense().clone() for p in model.parameters()]
    total = clip_grad_norm(model.parameters(), max_norm=expected * 2)
    assert total == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(b, p.grad.to_dense()) for b, p in zip(before, model.parameters()))  # not clipped
    total = clip_grad_norm(model.parameters(), max_norm=expected / 3)
    assert total == pytest.approx(expected, rel=1e-5)
    assert dense_norm(model) == pytest.approx(expected / 3, rel=1e-5)
    assert layer.expert_down.grad.is_sparse  # never densified
    for b, p in zip(before, model.parameters()):  # every gradient scaled by the same factor
        torch.testing.assert_close(p.grad.to_dense(), b / 3, rtol=1e-4, atol=1e-9)


def test_clip_grad_norm_sums_repeated_sparse_rows():
    param = torch.nn.Parameter(torch.zeros(5, 2))
    param.grad = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3]]), torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0]]), (5, 2))
    assert clip_grad_norm([param], 100.0) == pytest.approx(math.sqrt(3**2 + 2**2))
    assert clip_grad_norm([param], 1.0) == pytest.approx(math.sqrt(13))
    assert float(param.grad.to_dense().norm()) == pytest.approx(1.0, rel=1e-5)


# ---- evaluation ----------------------------------------------------------------------------------


def test_evaluate_bpb_of_zero_logits_is_log2_of_the_vocabulary():
    model = tiny_model()
    with torch.no_grad():
        model.norm.weight.zero_()  # logits = lm_head(0) = 0: uniform over 259 ids
    model.train()
    bpb = evaluate_bpb(model, VAL, seq_len=32, batch_size=8, max_batches=3)
    assert bpb == pytest.approx(math.log2(259), rel=1e-6)
    assert model.training  # mode restored


def test_evaluate_bpb_matches_a_manual_cross_entropy():
    model = tiny_model().eval()
    tokens = VAL.tokens[:50].long()  # one full window of 32 and a tail of 18, each read after BOS
    with torch.no_grad():
        nats = sum(
            torch.nn.functional.cross_entropy(
                model(torch.cat([torch.tensor([BOS]), window[:-1]]).unsqueeze(0))[0], window, reduction="sum")
            for window in (tokens[:32], tokens[32:])
        )
    bpb = evaluate_bpb(model, TokenData(tokens), seq_len=32, batch_size=8)
    assert bpb == pytest.approx(float(nats) / 50 / math.log(2), rel=1e-5)
    assert not model.training


# ---- training ------------------------------------------------------------------------------------


def test_training_lowers_val_bpb_well_below_the_untrained_model():
    model = tiny_model()
    untrained = evaluate_bpb(model, VAL, 32, 8)
    logs = []
    cfg = small_cfg(steps=150, warmup_steps=15, eval_every=50, log_every=25, lr=1e-2, expert_lr=1e-2)
    result = train(model, DATA, VAL, cfg, on_log=logs.append)
    assert result.steps_done == 150 and not result.stopped_early
    assert result.tokens_seen == 150 * 8 * 32
    assert result.final_val_bpb < 0.25 * untrained, (untrained, result.history)  # ~8.0 -> ~0.4
    assert result.history == logs
    assert [r["step"] for r in logs] == [25, 50, 75, 100, 125, 150]
    assert [r["step"] for r in logs if "val_bpb" in r] == [50, 100, 150]
    assert {"step", "loss", "lr", "tokens_per_s", "eta_s"} <= set(logs[0])
    assert logs[-1]["eta_s"] == 0 and logs[0]["tokens_per_s"] > 0
    assert logs[-1]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert result.final_val_bpb == logs[-1]["val_bpb"]


def test_should_stop_ends_training_early():
    model = tiny_model()
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 7

    result = train(model, DATA, VAL, small_cfg(steps=50, eval_every=5), should_stop=should_stop)
    assert result.stopped_early and result.steps_done == 7
    assert result.tokens_seen == 7 * 8 * 32
    assert result.final_val_bpb is None  # evaluated at step 5, trained twice since
    assert [r["step"] for r in result.history] == [5]


def test_frozen_experts_are_bit_identical_after_training():
    model = tiny_model(num_experts=16 * 16)
    layer = model.blocks[1].ffw
    new = model.grow(256, tag="new")[1]
    layer.freeze_segments([0])  # the whole initial pool
    arbitrary = torch.arange(new.start, new.end, 3)  # every third expert of the new segment
    layer.set_trainable(arbitrary, False)
    frozen = torch.cat([torch.arange(0, new.start), arbitrary])
    down, up = layer.expert_down.detach().clone(), layer.expert_up.detach().clone()
    dense_before = layer.query.weight.detach().clone()

    opts = build_optimizers(model, small_cfg())
    train(model, DATA, None, small_cfg(steps=30, track_usage=True), optimizers=opts)

    usage = layer.usage_counts
    assert usage[:new.start].sum() > 0 and usage[arbitrary].sum() > 0  # frozen experts were selected
    assert torch.equal(layer.expert_down[frozen], down[frozen])
    assert torch.equal(layer.expert_up[frozen], up[frozen])
    trainable_used = (usage > 0) & layer.trainable
    assert trainable_used.sum() > 0
    assert (layer.expert_up[trainable_used] != up[trainable_used]).any(dim=1).all()  # every one moved
    assert not torch.equal(layer.query.weight, dense_before)
    assert not layer.track_usage  # restored

    # untouched rows cost nothing: no step, no moment; every used trainable row has steps
    state_down = opts.experts.state[layer.expert_down]
    steps = state_down["step"]
    assert torch.equal(steps > 0, trainable_used)
    assert steps[frozen].eq(0).all()
    assert torch.count_nonzero(state_down["exp_avg"][~trainable_used]) == 0
    assert torch.count_nonzero(state_down["exp_avg_sq"][~trainable_used]) == 0


def test_training_does_not_count_usage_unless_asked():
    model = tiny_model()
    train(model, DATA, VAL, small_cfg(steps=3, eval_every=3))
    assert model.blocks[1].ffw.usage_counts.sum() == 0


def test_only_experts_train_when_every_dense_parameter_is_frozen():
    model = tiny_model()
    layer = model.blocks[1].ffw
    for param in model.parameters():
        param.requires_grad_(param is layer.expert_down or param is layer.expert_up)
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    up = layer.expert_up.detach().clone()
    opts = build_optimizers(model, small_cfg())
    state = opts.state_dict()
    assert state["experts"] is not None
    train(model, DATA, None, small_cfg(steps=3), optimizers=opts)
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters() if n in dense)
    assert not torch.equal(layer.expert_up, up)
    fresh = build_optimizers(model, small_cfg())
    fresh.load_state_dict(opts.state_dict())
    assert torch.equal(fresh.experts.state[layer.expert_up]["step"], opts.experts.state[layer.expert_up]["step"])


def test_eval_modules_keep_their_statistics_through_training_and_evaluations():
    model = tiny_model()
    norm = model.peer_layers()[1].query_norm
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    train(model, DATA, VAL, small_cfg(steps=12, eval_every=4), eval_modules=[norm])
    assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
    train(model, DATA, VAL, small_cfg(steps=4, eval_every=4))
    assert not torch.equal(norm.running_mean, mean), "without eval_modules the statistics move"


def test_loss_fn_receives_the_extras_of_the_batch():
    class Tagged:
        def sample_batch(self, batch_size, seq_len, generator=None):
            return (*DATA.sample_batch(batch_size, seq_len, generator), torch.arange(batch_size))

    seen = []

    def loss_fn(head, inputs, targets, extras):
        seen.append(extras[0].tolist())
        return torch.nn.functional.cross_entropy(head.logits().flatten(0, 1), targets.flatten())

    train(tiny_model(), Tagged(), None, small_cfg(steps=3), loss_fn=loss_fn)
    assert seen == [list(range(8))] * 3


def test_a_frozen_base_builds_no_graph_below_the_lowest_peer_layer_and_no_weight_gradients():
    """A retrofitted base (frozen, the pool beside block 2's feed-forward): blocks 0-1 run without autograd, blocks
    2-3 pass gradients through without computing their weights' gradients."""
    torch.manual_seed(0)
    config = ModelConfig(d_model=64, n_layers=4, n_heads=4, d_ff=128, max_seq_len=64, peer_layers=[2],
                         peer=PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16), peer_branch="parallel",
                         base_trains="none")
    model = PEERTransformer(config)
    tracked = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: tracked.__setitem__(i, out.requires_grad))
    train(model, DATA, None, small_cfg(steps=1))
    assert tracked == {0: False, 1: False, 2: True, 3: True}
    experts = {id(p) for p in model.blocks[2].expert_branch.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in experts)
    assert all(p.grad is not None for p in model.blocks[2].expert_branch.parameters() if p.requires_grad)
