"""GGUF bases: tiny files written as llama.cpp writes them, loaded by us and by transformers' own GGUF
loader (the reference), compared logit for logit and token for token."""
import json
import shutil

import pytest
import torch

from gguf_fixtures import write_gguf
from peer_model.generate import SamplingParams, generate_text
from peer_model.hf import UnsupportedModel, is_pretrained, load_hf, read_hf_config, retrofit
from peer_model.hf.gguf import find_gguf
from peer_model.config import PEERConfig

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Café naïve über Привет мир 日本 語 🙂 👍🏽",
         "In 2024, 1234567 people said “it's 3.14”", "<|im_start|>user\nHello<|im_end|>\n", "  two  spaces\n\n\nlines ",
         ""]


def reference(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@torch.no_grad()
def assert_logits_equal(ours, ref, seed: int = 1):
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(seed))
    expected = ref(ids).logits
    assert torch.allclose(ours(ids), expected, atol=1e-4, rtol=0), (ours(ids) - expected).abs().max()


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_llama_logits_equal_transformers_for_every_storage_type(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, "llama", qtype)
    ref, _ = reference(path)
    assert_logits_equal(load_hf(path), ref)


@pytest.mark.parametrize(("arch", "qtype", "tie"), [("qwen2", "Q8_0", False), ("qwen3", "F16", True),
                                                    ("llama", "Q4_1", False)])
def test_other_families_and_an_untied_head_equal_transformers(tmp_path, arch, qtype, tie):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, arch, qtype, tie=tie)
    ref, _ = reference(path)
    ours = load_hf(path)
    assert ours.config.tie_embeddings == tie
    assert_logits_equal(ours, ref)


def test_f32_file_holds_the_source_model_exactly(tmp_path):
    """Dequantisation aside, the name map and the undone q/k permutation give back the very model the
    file was written from (an independent check of :func:`unpermute`: transformers is not involved)."""
    path = tmp_path / "tiny.gguf"
    source = write_gguf(path, "llama", "F32")
    ids = torch.randint(0, source.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(load_hf(path)(ids), source(ids).logits, atol=1e-5, rtol=0)


def test_tokenizer_ids_equal_transformers_gguf_tokenizer(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", "Q8_0")
    _, ref = reference(path)
    ours = load_hf(path).tokenizer
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text, add_special_tokens=False)["input_ids"],
                                                           skip_special_tokens=True)
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)


def test_special_ids_and_bos_rule_come_from_the_metadata(tmp_path):
    no_bos, with_bos = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf(no_bos, "llama", "F16", add_bos=False)
    write_gguf(with_bos, "llama", "F16", add_bos=True)
    tokenizer = load_hf(no_bos).tokenizer
    im_start, im_end = tokenizer.encode("<|im_start|>")[0], tokenizer.encode("<|im_end|>")[0]
    assert (tokenizer.bos_id, tokenizer.add_bos, tokenizer.eos_ids) == (im_start, False, {im_end})
    assert tokenizer.never_sampled == frozenset({tokenizer.encode("<|endoftext|>")[0]})  # the pad
    assert load_hf(with_bos).tokenizer.add_bos
    for path, expected in ((no_bos, []), (with_bos, [im_start])):
        _, ref = reference(path)
        assert ref("hello", add_special_tokens=True)["input_ids"][: len(expected)] == expected


def test_digits_split_one_by_one_for_smollm_pre_tokenizer(tmp_path):
    """llama.cpp's "smollm" pre-tokenizer (SmolLM2's Digits(individual_digits) before the byte-level split)."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", "F16", pre="smollm")
    tokenizer = load_hf(path).tokenizer
    assert [tokenizer.decode([i]) for i in tokenizer.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]


def test_greedy_generation_equals_transformers_generate(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", "Q8_0")
    ref, ref_tokenizer = reference(path)
    ours = load_hf(path)
    prompt = "The quick brown fox"
    ids = ref_tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=sorted(ours.tokenizer.eos_ids),
                            pad_token_id=ours.tokenizer.pad_id)[0, ids.shape[1]:].tolist()
    result = generate_text(ours, ours.tokenizer, prompt, SamplingParams(max_tokens=12, temperature=0.0))
    assert list(result.token_ids) == expected


def test_a_directory_with_one_gguf_file_loads_and_several_are_refused(tmp_path):
    (tmp_path / "one").mkdir()
    write_gguf(tmp_path / "one" / "m.gguf", "llama", "F16")
    assert find_gguf(tmp_path / "one") == tmp_path / "one" / "m.gguf" and is_pretrained(tmp_path / "one")
    assert read_hf_config(tmp_path / "one")["num_hidden_layers"] == 2
    assert load_hf(tmp_path / "one").config.n_layers == 2
    shutil.copy(tmp_path / "one" / "m.gguf", tmp_path / "one" / "n.gguf")
    with pytest.raises(UnsupportedModel, match="several GGUF files"):
        load_hf(tmp_path / "one")


def test_unsupported_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UnsupportedModel, match="not a readable GGUF file"):
        load_hf(bad)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", "F16", pre="some-new-pre-tokenizer")
    with pytest.raises(UnsupportedModel, match="pre-tokenizer 'some-new-pre-tokenizer' is not supported"):
        load_hf(path)


def test_retrofit_of_a_gguf_base_preserves_its_logits(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", "Q4_K")
    base = load_hf(path)
    model = retrofit(base, PEERConfig(num_experts=64, heads=2, top_k=4, d_key=16))
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


def test_peer_retrofit_cli_takes_a_gguf_file(tmp_path, capsys):
    from peer_model.cli import main

    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", "Q8_0")
    main(["retrofit", str(path), "--out", str(tmp_path / "run"), "--experts", "64", "--peer-heads", "2",
          "--top-k", "4", "--d-key", "16"])
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "llama" and report["peer_layers"] == [1]
