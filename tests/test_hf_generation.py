"""Greedy completions and chat replies of every supported family, token for token against transformers'
``generate`` on the same directory with its own tokenizer: the special tokens (a BOS only where the tokenizer
adds one, every EOS id, the chat template's end of turn) follow the tokenizer's rules as transformers does."""
import pytest
import torch

from hf_fixtures import build_tiny_model_dir
from peer_model.generate import SamplingParams, generate, generate_text
from peer_model.hf import load_hf

transformers = pytest.importorskip("transformers")

CASES = [("llama", "llama3"), ("llama", "chatml"), ("mistral", "llama3"), ("qwen2", "chatml"), ("qwen3", "chatml"),
         ("gpt2", "gpt2")]
PROMPTS = ["The quick brown fox", "Café naïve über", ""]
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def pair(request, tmp_path_factory):
    family, style = request.param
    path = build_tiny_model_dir(tmp_path_factory.mktemp(f"{family}-{style}"), family=family, style=style, seed=3)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return load_hf(path), reference, tokenizer


def reference_greedy(reference, tokenizer, ids: list[int]) -> list[int]:
    config = reference.generation_config
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    end_of_turn = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>")
                   if tokenizer.chat_template and t in tokenizer.chat_template]
    start = ids or [config.bos_token_id if config.bos_token_id is not None else eos[0]]
    with torch.no_grad():
        out = reference.generate(torch.tensor([start]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=[*eos, *end_of_turn], pad_token_id=eos[0])
    return out[0, len(start):].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_transformers(pair, prompt):
    ours, reference, tokenizer = pair
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    result = generate_text(ours, ours.tokenizer, prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    assert list(result.token_ids) == reference_greedy(reference, tokenizer, ids)


def test_greedy_chat_reply_equals_transformers(pair):
    ours, reference, tokenizer = pair
    if tokenizer.chat_template is None:
        pytest.skip("this family's tokenizer has no chat template")
    messages = [{"role": "user", "content": "The cat sat on the mat?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours.tokenizer.apply_chat_template(messages) == text
    prompt = ours.tokenizer.encode(text)
    if ours.tokenizer.add_bos:  # the template wrote the BOS: generation adds it, so the prompt goes without
        prompt = prompt[1:]
    steps = list(generate(ours, prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)))
    assert [s.token_id for s in steps] == reference_greedy(reference, tokenizer, ids)
