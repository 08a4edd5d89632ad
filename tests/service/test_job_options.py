"""How a training job's options resolve over the service settings into a continual-training stage."""
from __future__ import annotations

import pytest

from service.errors import InvalidInput
from service.settings import Settings
from service.training import continual_options, parse_job_options

DEFAULTS = dict(strategy="replay", replay_fraction=0.5, distill_weight=1.0, new_experts=4096)


def resolve(options: dict, has_old_corpora: bool = True, has_pool: bool = True):
    return continual_options(Settings(**DEFAULTS), parse_job_options(options), has_old_corpora, has_pool)


# job options, has_old_corpora, has_pool -> (strategy, replay_fraction, distill_weight, new_experts)
CASES = [
    ({}, True, True, ("replay", 0.5, 1.0, 4096)),  # the default: replay + distillation, the pool grows
    ({}, False, True, ("naive", 0.0, 0.0, 0)),  # a fresh model is pre-trained as a whole
    ({"freeze_old_experts": True}, True, True, ("grow_freeze_protect", 0.5, 1.0, 4096)),
    ({"freeze_old_experts": False}, True, True, ("replay", 0.5, 1.0, 4096)),
    ({"freeze_old_experts": False, "replay_fraction": 0}, True, True, ("naive", 0.0, 0.0, 0)),
    ({"strategy": "grow_freeze_protect"}, False, True, ("grow_freeze", 0.0, 0.0, 4096)),  # nothing old to protect
    ({"strategy": "replay", "distill_weight": 0}, True, True, ("replay", 0.5, 0.0, 4096)),  # plain replay
    ({"strategy": "replay", "new_experts": 0}, True, True, ("replay", 0.5, 1.0, 0)),
    ({"distill_weight": 0.2, "new_experts": 128}, True, True, ("replay", 0.5, 0.2, 128)),
    ({}, True, False, ("replay", 0.5, 1.0, 0)),  # a baseline feed-forward cannot grow
    ({"strategy": "grow_freeze_protect"}, True, False, ("replay", 0.5, 1.0, 0)),
    ({"strategy": "grow_freeze", "distill_weight": 3.0}, True, True, ("grow_freeze", 0.0, 0.0, 4096)),
    ({"strategy": "sparse_finetune"}, True, True, ("sparse_finetune", 0.0, 0.0, 0)),
]


@pytest.mark.parametrize("options, has_old, has_pool, expected", CASES)
def test_job_options_resolve_over_the_settings(options, has_old, has_pool, expected):
    resolved = resolve(options, has_old, has_pool)
    assert (resolved.strategy, resolved.replay_fraction, resolved.distill_weight, resolved.new_experts) == expected


def test_replay_with_distillation_but_no_replay_is_rejected():
    with pytest.raises(InvalidInput, match="replay_fraction"):
        resolve({"strategy": "replay", "replay_fraction": 0})
