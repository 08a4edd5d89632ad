"""Checkpoints: exact round trip of grown pools, growth after loading, errors, crash safety."""
import json

import pytest
import torch

import peer_model.checkpoint as checkpoint
from peer_model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta, save_checkpoint
from peer_model.config import ModelConfig, PEERConfig
from peer_model.model import PEERTransformer


def tiny_model(seed: int = 0) -> PEERTransformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        d_model=64, n_layers=3, n_heads=4, d_ff=128, max_seq_len=64, peer_layers=[0, 2],
        peer=PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16),
    )
    model = PEERTransformer(config)
    model.train()
    with torch.no_grad():  # non-default BatchNorm running statistics, so they must round-trip too
        model(torch.randint(0, 256, (4, 32)))
    return model.eval()


TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model.eval()(TOKENS)


def test_round_trip_of_a_grown_model_is_exact(tmp_path):
    model = tiny_model()
    model.grow(100, tag="corpus-a")
    model.grow(60, tag="corpus-b")
    with torch.no_grad():  # grown up-vectors start at zero; make every row matter
        for layer in model.peer_layers().values():
            layer.expert_up.normal_(std=0.05)
    save_checkpoint(model, tmp_path / "ckpt", extra={"version": 3, "corpus": "a"})

    loaded = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.lm_head.weight is loaded.embed.weight  # still tied
    for i, layer in model.peer_layers().items():
        assert loaded.peer_layers()[i].segments == layer.segments
        assert [s.tag for s in loaded.peer_layers()[i].segments] == ["initial", "corpus-a", "corpus-b"]
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)

    meta = read_checkpoint_meta(tmp_path / "ckpt")
    assert meta["format"] == 1 and meta["extra"] == {"version": 3, "corpus": "a"}
    assert meta["model"] == model.config.to_dict()
    assert set(meta["pools"]) == {"0", "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def test_a_smaller_pool_loads_and_grows_with_old_rows_unchanged(tmp_path):
    model = tiny_model()
    save_checkpoint(model, tmp_path / "small")
    loaded = load_checkpoint(tmp_path / "small", device="cpu")
    old = {i: (layer.expert_down.detach().clone(), layer.sub_keys1.detach().clone())
           for i, layer in loaded.peer_layers().items()}
    segments = loaded.grow(200, tag="new")
    for i, layer in loaded.peer_layers().items():
        down, keys1 = old[i]
        assert layer.num_experts == segments[i].end > down.shape[0]
        assert torch.equal(layer.expert_down[: down.shape[0]], down)
        assert torch.equal(layer.sub_keys1[: keys1.shape[0]], keys1)
    save_checkpoint(loaded, tmp_path / "grown")
    assert torch.equal(logits(load_checkpoint(tmp_path / "grown")), logits(loaded))


def test_loads_onto_the_requested_device(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ckpt")
    for device in ("cpu", torch.device("cpu")):
        model = load_checkpoint(tmp_path / "ckpt", device=device)
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert {b.device.type for b in model.buffers()} == {"cpu"}


def test_extra_must_be_json(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tiny_model(), tmp_path / "ckpt", extra={"tensor": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", [
    "missing_dir", "missing_config", "missing_weights", "truncated_weights", "garbage_weights",
    "bad_json", "wrong_format", "missing_pools", "wrong_shape",
])
def test_missing_or_corrupt_checkpoints_raise_checkpoint_error(tmp_path, damage):
    path = tmp_path / "ckpt"
    save_checkpoint(tiny_model(), path)
    weights, config = path / "model.safetensors", path / "config.json"
    meta = json.loads(config.read_text())
    if damage == "missing_dir":
        path = tmp_path / "nowhere"
    elif damage == "missing_config":
        config.unlink()
    elif damage == "missing_weights":
        weights.unlink()
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "garbage_weights":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "bad_json":
        config.write_text("{not json")
    elif damage == "wrong_format":
        config.write_text(json.dumps({**meta, "format": 99}))
    elif damage == "missing_pools":
        del meta["pools"]
        config.write_text(json.dumps(meta))
    elif damage == "wrong_shape":
        meta["model"]["d_model"] = 32
        config.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old_model, new_model = tiny_model(0), tiny_model(1)
    save_checkpoint(old_model, path, extra={"which": "old"})

    def crash_mid_write(model, filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # e.g. the worker is killed

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_model", crash_mid_write)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(new_model, path, extra={"which": "new"})
    assert read_checkpoint_meta(path)["extra"] == {"which": "old"}
    assert torch.equal(logits(load_checkpoint(path)), logits(old_model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    save_checkpoint(new_model, path, extra={"which": "new"})
    assert read_checkpoint_meta(path)["extra"] == {"which": "new"}
    assert torch.equal(logits(load_checkpoint(path)), logits(new_model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_crash_between_the_renames_still_finds_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old_model, new_model = tiny_model(0), tiny_model(1)
    save_checkpoint(old_model, path, extra={"which": "old"})
    real_replace, calls = checkpoint.os.replace, []

    def replace_then_crash(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old checkpoint is moved aside, the new one not yet in place
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "replace", replace_then_crash)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(new_model, path, extra={"which": "new"})
    assert not path.exists()
    assert read_checkpoint_meta(path)["extra"] == {"which": "old"}
    assert torch.equal(logits(load_checkpoint(path)), logits(old_model))

    save_checkpoint(new_model, path, extra={"which": "new"})  # the next save recovers
    assert read_checkpoint_meta(path)["extra"] == {"which": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_bf16_checkpoint_loads_in_fp32_on_the_cpu(tmp_path):
    """Trained on a GPU with bf16 parameters, served or trained on further on a CPU (no bf16 expert path)."""
    from peer_model.train import cast_parameters

    model = PEERTransformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                        peer=PEERConfig(num_experts=64, heads=2, top_k=4, d_key=16))).eval()
    cast_parameters(model, torch.bfloat16)
    save_checkpoint(model, tmp_path / "run")
    loaded = load_checkpoint(tmp_path / "run")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), loaded(tokens))
    expected = {k: v.float() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
