"""How a training job's options resolve over the service settings into a continual-training stage."""
from __future__ import annotations

import pytest

from service.errors import InvalidInput
from service.jobs.options import continual_options, parse_job_options, replay_source
from service.settings import Settings

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


def test_chill_and_review_apply_only_where_there_is_something_old_to_protect():
    settings = Settings(**DEFAULTS, old_lr_scale=0.2, review_steps=15)
    stage = continual_options(settings, parse_job_options({}), has_old_corpora=True)
    assert (stage.old_lr_scale, stage.review_steps) == (0.2, 15)
    fresh = continual_options(settings, parse_job_options({}), has_old_corpora=False)
    assert (fresh.old_lr_scale, fresh.review_steps) == (1.0, 0), "a fresh model's pre-training runs at full rate"
    asked = continual_options(settings, parse_job_options({"old_lr_scale": 0.5, "review_steps": 0}), True)
    assert (asked.old_lr_scale, asked.review_steps) == (0.5, 0)


def test_a_job_on_a_pretrained_base_takes_that_bases_shape_and_the_replay_settings():
    settings = Settings(**DEFAULTS, train_steps=300, base_train_steps=60, replay_windows=96, replay_batch=32,
                        replay_weights="int8", train_expert_lr=3e-3, base_train_expert_lr=3e-2)
    fresh = continual_options(settings, parse_job_options({}), True)
    assert (fresh.train.steps, fresh.train.expert_lr) == (300, 3e-3)
    pretrained = continual_options(settings, parse_job_options({}), True, pretrained=True)
    assert (pretrained.train.steps, pretrained.train.expert_lr) == (60, 3e-2)
    assert pretrained.train.lr == fresh.train.lr == settings.train_lr
    assert (pretrained.generated_windows, pretrained.generated_batch, pretrained.generated_weights) == (96, 32, "int8")
    assert continual_options(settings, parse_job_options({"steps": 7}), True, pretrained=True).train.steps == 7


@pytest.mark.parametrize("options", [{"old_lr_scale": 1.5}, {"old_lr_scale": -0.1}, {"review_steps": -1},
                                     {"steps": 10**6}, {"review_steps": 10**6}])
def test_out_of_range_chill_review_and_step_counts_are_rejected(options):
    with pytest.raises(InvalidInput):
        resolve(options)


def test_peer_layers_setting_places_the_expert_blocks():
    assert Settings(n_layers=4).fresh_model_config().peer_layers == [2]
    assert Settings(n_layers=4, peer_layers="all").fresh_model_config().peer_layers == [0, 1, 2, 3]
    assert Settings(n_layers=4, peer_layers="0,3").fresh_model_config().peer_layers == [0, 3]
    with pytest.raises(ValueError):
        Settings(peer_layers="every")
    with pytest.raises(ValueError, match='"middle", "all" or'):
        Settings(peer_layers="spread:4")  # a fresh model's blocks are counted by PEER_N_LAYERS: indices do


@pytest.mark.parametrize("spec", ["middle", "all", "spread:4", "6,12"])
def test_base_layers_setting_takes_a_depth_free_spread(spec):
    assert Settings(base_layers=spec).base_layers == spec


@pytest.mark.parametrize("spec", ["spread", "spread:x", "spread:-1", "every"])
def test_base_layers_setting_refuses_other_specs(spec):
    with pytest.raises(ValueError, match='base_layers must be "middle", "all", "spread:K"'):
        Settings(base_layers=spec)


def test_a_job_on_a_pretrained_base_replays_its_samples_beside_the_earlier_corpora():
    settings = Settings(**DEFAULTS)
    default = continual_options(settings, parse_job_options({}), True, pretrained=True)
    assert replay_source(default, corpora_gone=False, corpora_available=True, pretrained=True) == "both"
    assert replay_source(default, corpora_gone=False, corpora_available=False, pretrained=True) == "parent"
    assert replay_source(default, corpora_gone=False, corpora_available=True, pretrained=False) == "corpora"
    assert replay_source(default, corpora_gone=True, corpora_available=True, pretrained=False) == "parent"
    naive = continual_options(settings, parse_job_options({"strategy": "naive"}), True, pretrained=True)
    assert replay_source(naive, corpora_gone=False, corpora_available=True, pretrained=True) == "corpora"
