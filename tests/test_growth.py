"""Growth preserves the model's function exactly, and the new experts still become reachable as they train."""
import copy

import pytest
import torch

from peer_model.checkpoint import load_checkpoint, save_checkpoint
from peer_model.config import PEERConfig
from peer_model.peer import PEER
from peer_model.train import evaluate_bpb, train
from test_train import DATA, VAL, small_cfg, tiny_model


@pytest.fixture(scope="module")
def trained():
    model = tiny_model(num_experts=32 * 32)
    train(model, DATA, VAL, small_cfg(steps=150, warmup_steps=15, eval_every=150, log_every=50, lr=1e-2, expert_lr=1e-2))
    return model.eval()


def new_expert_share(layer: PEER, x: torch.Tensor, first_new: int) -> float:
    ids = layer.route(x.reshape(-1, layer.d_model))[1]
    return float((ids >= first_new).float().mean())


@pytest.mark.parametrize("key_scale", [0.5, 1.0])
def test_doubling_a_random_layer_changes_neither_its_output_nor_its_selections(key_scale):
    """The issue's setting: a random 32² layer (4 heads, k 8) doubled used to move 7.5% of the
    selections to new experts and the output by 22%."""
    torch.manual_seed(0)
    layer = PEER(64, PEERConfig(num_experts=32 * 32, heads=4, top_k=8, d_key=32)).eval()
    x = torch.randn(512, 64)
    before = layer(x)
    layer.grow(32 * 32, key_scale=key_scale)
    assert layer.num_experts >= 2 * 32 * 32
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)
    assert new_expert_share(layer, x, 32 * 32) == 0.0


@pytest.mark.parametrize("which", ["random", "trained"])
@pytest.mark.parametrize("fraction", [0.25, 1.0, 3.0])
def test_growth_leaves_the_logits_unchanged(trained, which, fraction):
    model = trained if which == "trained" else tiny_model(seed=3, num_experts=32 * 32).eval()
    inputs = VAL.sample_batch(8, 48, torch.Generator().manual_seed(1))[0]
    with torch.no_grad():
        before = model(inputs)
        grown = copy.deepcopy(model)
        grown.grow(int(32 * 32 * fraction), tag="new")
        after = grown(inputs)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    layer = grown.peer_layers()[1]
    hidden = torch.randn(256, 64)
    assert new_expert_share(layer, hidden, 32 * 32) == 0.0


def test_grown_segments_are_new_until_trained_and_survive_a_checkpoint(trained, tmp_path):
    grown = copy.deepcopy(trained)
    grown.grow(500, tag="b")
    assert [s.status for s in grown.peer_layers()[1].segments] == ["active", "new"]
    save_checkpoint(grown, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert [s.status for s in loaded.peer_layers()[1].segments] == ["active", "new"]
    inputs = VAL.sample_batch(4, 32, torch.Generator().manual_seed(2))[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), trained(inputs), atol=1e-5, rtol=0)


def test_opening_starts_below_every_old_score_and_ends_in_the_competition(trained):
    grown = copy.deepcopy(trained)
    grown.grow(32 * 32, tag="new")
    layer = grown.peer_layers()[1]
    x = torch.randn(512, 64)
    layer.open_new_segments(0.0)
    assert new_expert_share(layer, x, 32 * 32) == 0.0, "at the start of the ramp no new expert may win"
    layer.open_new_segments(1.0)
    assert layer.segments[-1].status == "active"
    assert new_expert_share(layer, x, 32 * 32) > 0.0


def test_training_opens_the_new_segment_and_the_new_experts_learn(trained):
    grown = copy.deepcopy(trained)
    grown.grow(32 * 32, tag="new")
    layer = grown.peer_layers()[1]
    layer.freeze_segments([0])
    train(grown, DATA, None, small_cfg(steps=20, warmup_steps=4))
    assert layer.segments[-1].status == "active"
    assert layer.expert_up[32 * 32:].abs().sum() > 0, "new experts were never updated"
    inputs = DATA.sample_batch(8, 32, torch.Generator().manual_seed(5))[0]
    layer.track_usage = True
    layer.reset_usage()
    grown.eval()
    with torch.no_grad():
        grown(inputs)
    assert int(layer.usage_counts[32 * 32:].sum()) > 0, "the opened experts must be selected"


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_once_open_growth_moves_held_out_loss_by_less_than_one_percent(trained, fraction):
    """With the segment opened at once (no training), the key scale of new sub-keys bounds the damage."""
    before = evaluate_bpb(trained, VAL, 32, 8)
    grown = copy.deepcopy(trained)
    grown.grow(int(32 * 32 * fraction), tag="new")
    layer = grown.peer_layers()[1]
    layer.open_new_segments(1.0)
    layer.track_usage = True
    after = evaluate_bpb(grown, VAL, 32, 8)
    assert abs(after - before) / before < 0.01, (before, after)
    assert int(layer.usage_counts[32 * 32:].sum()) > 0, "retrieval must reach the new experts, or they can never learn"


def test_data_keyed_sub_keys_are_rescaled_query_halves():
    torch.manual_seed(0)
    layer = PEER(64, PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16))
    old1, old2 = layer.sub_keys1.detach().clone(), layer.sub_keys2.detach().clone()
    layer.grow(rows=20, cols=19)
    queries = torch.randn(300, 2 * 16)
    layer.key_new_sub_keys(queries, 16, 16, torch.Generator().manual_seed(1))
    assert torch.equal(layer.sub_keys1[:16], old1) and torch.equal(layer.sub_keys2[:16], old2)
    for keys, old, halves in ((layer.sub_keys1, old1, queries.view(-1, 16)[:, :8]),
                              (layer.sub_keys2, old2, queries.view(-1, 16)[:, 8:])):
        new = keys[16:].detach()
        torch.testing.assert_close(new.norm(dim=1), old.norm(dim=1).mean().expand(len(new)))
        cosine = torch.nn.functional.normalize(new, dim=1) @ torch.nn.functional.normalize(halves, dim=1).t()
        assert bool((cosine.max(dim=1).values > 1 - 1e-5).all()), "every new sub-key points along a query half"
