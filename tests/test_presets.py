"""Named shapes: each builds (on the meta device: no memory), and the sizes its docstring states hold."""
import pytest
import torch

from peer_model.model import PEERTransformer
from peer_model.presets import PRESETS, preset_config


def parameters(name: str) -> tuple[int, int]:
    """(expert-table parameters, every other parameter) of the preset's model."""
    with torch.device("meta"):
        model = PEERTransformer(PRESETS[name])
    experts = sum(p.numel() for layer in model.peer_layers().values() for p in (layer.expert_down, layer.expert_up))
    return experts, sum(p.numel() for p in model.parameters()) - experts


@pytest.mark.parametrize("name, experts, dense_millions", [
    ("gpu-base", 2 * 1024**2 * 1024, 144), ("gpu-large", 3 * 2 * 1024**2 * 2048, 1114), ("cpu-small", 2 * 128**2 * 192, 1.6),
])
def test_preset_sizes_are_the_documented_ones(name, experts, dense_millions):
    counted_experts, dense = parameters(name)
    assert counted_experts == experts
    assert dense / 1e6 == pytest.approx(dense_millions, rel=0.02)


def test_overrides_replace_fields_and_a_new_depth_moves_the_peer_block_to_its_middle():
    config = preset_config("gpu-large", n_layers=8, d_model=256)
    assert (config.n_layers, config.d_model, config.n_heads, config.peer_layers) == (8, 256, 16, [4])
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("tpu-huge")


def test_the_service_preset_setting_fills_the_shape_settings_not_given(monkeypatch):
    from service.settings import Settings

    monkeypatch.setenv("PEER_PRESET", "gpu-base")
    monkeypatch.setenv("PEER_N_LAYERS", "6")
    config = Settings().fresh_model_config()
    assert (config.d_model, config.n_layers, config.n_heads, config.peer_layers) == (1024, 6, 16, [3])
    assert config.peer == PRESETS["gpu-base"].peer
    monkeypatch.delenv("PEER_PRESET")
    assert Settings().fresh_model_config().d_model == 192  # no preset: the settings' own defaults
    with pytest.raises(ValueError, match="preset must be one of"):
        Settings(preset="tpu-huge")
