"""Growth must not hurt a trained model, and the new experts must be reachable (so they can learn)."""
import copy

import pytest

from peer_model.train import evaluate_bpb, train
from test_train import DATA, VAL, small_cfg, tiny_model


@pytest.fixture(scope="module")
def trained():
    model = tiny_model(num_experts=32 * 32)
    train(model, DATA, VAL, small_cfg(steps=150, warmup_steps=15, eval_every=150, log_every=50, lr=1e-2, expert_lr=1e-2))
    return model


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_growth_moves_held_out_loss_by_less_than_one_percent(trained, fraction):
    before = evaluate_bpb(trained, VAL, 32, 8)
    grown = copy.deepcopy(trained)
    grown.grow(int(32 * 32 * fraction), tag="new")
    layer = grown.peer_layers()[1]
    layer.track_usage = True
    after = evaluate_bpb(grown, VAL, 32, 8)
    assert abs(after - before) / before < 0.01, (before, after)
    new_selections = int(layer.usage_counts[32 * 32:].sum())
    assert new_selections > 0, "retrieval must reach the new experts, or they can never learn"


def test_new_experts_learn_after_growth(trained):
    grown = copy.deepcopy(trained)
    grown.grow(32 * 32, tag="new")
    layer = grown.peer_layers()[1]
    layer.freeze_segments([0])
    train(grown, DATA, None, small_cfg(steps=20, warmup_steps=2))
    assert layer.expert_up[32 * 32:].abs().sum() > 0, "new experts were never updated"
