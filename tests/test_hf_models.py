"""Pretrained families loaded by our own modules, compared with ``transformers`` on the same tokens.

Each family is a tiny random configuration built by ``transformers`` and saved with
``save_pretrained``; our loader reads the directory and must give the same logits (fp32, ≤ 1e-4),
in a full forward, through the KV cache (prefill + one token at a time) and in a ragged batch.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from peer_model.config import PEERConfig  # noqa: E402
from peer_model.hf import export_hf, load_hf, resolve_layers, retrofit  # noqa: E402
from peer_model.hf.families import UnsupportedModel  # noqa: E402
from peer_model.model import KVCache  # noqa: E402

TOL = 1e-4
VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=128)

FAMILIES = {
    "llama3-gqa-untied": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    "llama2-linear-rope": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "smollm-tied": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=1, tie_word_embeddings=True),
    "qwen2-bias-yarn": lambda: transformers.Qwen2Config(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen3-qknorm": lambda: transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=4096),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                                            bos_token_id=0, eos_token_id=0),
}


def save_family(name: str, path) -> "transformers.PreTrainedModel":
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(FAMILIES[name]()).eval()
    with torch.no_grad():  # random norms and biases, so a wrongly mapped one cannot hide behind 1s and 0s
        for param_name, param in reference.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    reference.save_pretrained(path)
    return reference


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    reference = save_family(request.param, path)
    return request.param, reference, path


def tokens(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_logits(reference, ids: torch.Tensor) -> torch.Tensor:
    return reference(input_ids=ids).logits


def test_logits_equal_transformers(family):
    name, reference, path = family
    model = load_hf(path)
    ids = tokens()
    with torch.no_grad():
        ours = model(ids)
    assert (ours - reference_logits(reference, ids)).abs().max() <= TOL, name


def test_kv_cached_decoding_equals_full_forward(family):
    name, reference, path = family
    model = load_hf(path)
    ids = tokens(length=20)
    expected = reference_logits(reference, ids)
    cache = model.new_cache(2, 20)
    with torch.no_grad():
        steps = [model(ids[:, :12], cache)]
        steps += [model(ids[:, t : t + 1], cache) for t in range(12, 20)]
    assert (torch.cat(steps, dim=1) - expected).abs().max() <= TOL, name


def test_ragged_batch_decoding_equals_each_sequence_alone(family):
    """Two sequences at different positions decode in one batch (the serving engine's step)."""
    name, reference, path = family
    model = load_hf(path)
    first, second = tokens(1, 9, seed=2), tokens(1, 5, seed=3)
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        for row, seq in enumerate((first, second)):
            view = KVCache(cache.keys[:, row : row + 1], cache.values[:, row : row + 1])
            model(seq[:, :-1], view)
        cache.lengths = torch.tensor([first.shape[1] - 1, second.shape[1] - 1])
        logits = model(torch.cat([first[:, -1:], second[:, -1:]]), cache)[:, -1]
    for row, seq in enumerate((first, second)):
        expected = reference_logits(reference, seq)[0, -1]
        assert (logits[row] - expected).abs().max() <= TOL, name


def test_sharded_checkpoint_loads(tmp_path):
    reference = save_family("qwen3-qknorm", tmp_path / "whole")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(load_hf(tmp_path / "sharded")(ids), load_hf(tmp_path / "whole")(ids))


def test_unsupported_family_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UnsupportedModel, match="model_type 'bert' is not supported"):
        load_hf(tmp_path)


PEER = PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16)


@pytest.mark.parametrize("spec, n_layers, expected", [
    ("middle", 30, [15]), ("spread:4", 30, [6, 12, 18, 24]), ("spread:1", 30, [15]), ("spread:4", 24, [4, 9, 14, 19]),
    ("spread:3", 3, [0, 1, 2]), ("spread:4", 2, [0, 1]), ("2,0", 3, [0, 2]), ([1], 3, [1]), ("all", 2, [0, 1])])
def test_resolve_layers_names_the_blocks(spec, n_layers, expected):
    assert resolve_layers(spec, n_layers) == expected


@pytest.mark.parametrize("spec", ["spread:0", "spread:", "3,x", "30", ""])
def test_resolve_layers_refuses_what_names_no_block(spec):
    with pytest.raises(ValueError, match="retrofit layers"):
        resolve_layers(spec, 30)


@pytest.mark.parametrize("name", ["llama3-gqa-untied", "gpt2"])
def test_parallel_retrofit_preserves_logits_and_freezes_the_base(tmp_path, name):
    reference = save_family(name, tmp_path)
    base = load_hf(tmp_path)
    model = retrofit(base, PEER, layers="all")
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".expert_branch." in n for n in trainable)
    assert len(model.peer_layers()) == 3
    # growth keeps the function too
    model.grow(100, tag="new")
    with torch.no_grad():
        assert (model(ids) - reference_logits(reference, ids)).abs().max() <= TOL


def test_replace_retrofit_changes_the_function(tmp_path):
    save_family("smollm-tied", tmp_path)
    base = load_hf(tmp_path)
    model = retrofit(base, PEER, layers=[1], branch="replace")
    ids = tokens()
    with torch.no_grad():
        assert not torch.allclose(model(ids), base(ids))
    assert "blocks.1.ffw.up.weight" not in model.state_dict()


def _train_a_little(model, steps: int = 3) -> None:
    """Move the expert layers off their zero start so that export has something to carry."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for step in range(steps):
        ids = tokens(seed=10 + step)
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("name", ["qwen2-bias-yarn", "gpt2"])
def test_export_round_trip(tmp_path, name):
    reference = save_family(name, tmp_path / "base")
    model = retrofit(load_hf(tmp_path / "base"), PEER, layers="middle")
    _train_a_little(model)
    export_hf(model, tmp_path / "out")
    ids = tokens()
    # transformers reads the base model back unchanged (it ignores the expert tensors)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (reference_logits(exported, ids) - reference_logits(reference, ids)).abs().max() <= TOL
    # our loader reads the retrofitted model back, experts included
    again = load_hf(tmp_path / "out")
    with torch.no_grad():
        assert not torch.allclose(model(ids), reference_logits(reference, ids))
        assert (again(ids) - model(ids)).abs().max() <= TOL
    assert again.config.base_trains == "none" and list(again.peer_layers()) == [1]
