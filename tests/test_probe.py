"""Probe scoring: batched greedy answers equal a brute-force greedy loop, exact-match rules, probe files."""
import json

import pytest
import torch

from peer_model.probe import ProbeItem, is_correct, load_probe, parse_probe, probe_answers, score_probe
from peer_model.tokenizer import ByteTokenizer
from test_generate import tiny_model


class NoBosBytes(ByteTokenizer):
    """Bytes whose contexts start with the text itself (as SmolLM2's and GPT-2's do)."""

    add_bos = False


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_seq_len=64, seed=5)


def brute_force_greedy(model, prompt: str, max_new_tokens: int) -> str:
    """The reference: the whole sequence through the model's forward at every step (no cache, no batch), the
    argmax over the ids generation may sample, stopping at an EOS or the context window."""
    tok = model.tokenizer
    ids = tok.encode(prompt)
    seq = [tok.bos_id, *ids] if tok.add_bos or not ids else list(ids)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([seq]))[0, -1].clone()
            logits[sorted(tok.never_sampled)] = float("-inf")
            nxt = int(logits.argmax())
            if nxt in tok.eos_ids:
                break
            out.append(nxt)
            if len(seq) == model.config.max_seq_len:
                break
            seq.append(nxt)
    return tok.decode(out)


PROMPTS = ["The capital of France is", "2 + 2 =", "a", "Once upon a time, in a land far away,", "Q: x?\nA:",
           "zz", "The river flows into the", "Ünïcödé ☃ is"]


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), NoBosBytes()], ids=["bos", "no-bos"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_answers_equal_brute_force_greedy(model, tokenizer, batch_size):
    model.tokenizer = tokenizer
    try:
        items = [ProbeItem(p, "x" * (i % 4 + 1)) for i, p in enumerate(PROMPTS)]
        answers = probe_answers(model, tokenizer, items, batch_size=batch_size)
        # the default budget: the longest answer's tokens (4 bytes) + 2
        assert answers == [brute_force_greedy(model, item.prompt, 6) for item in items]
        assert probe_answers(model, tokenizer, items, max_new_tokens=11, batch_size=batch_size) == [
            brute_force_greedy(model, item.prompt, 11) for item in items]
    finally:
        model.tokenizer = ByteTokenizer()


def test_a_long_prompt_is_answered_up_to_the_context_window(model):
    prompt = "y" * 60  # BOS + 60 bytes: 4 positions left in a 64-token window
    assert probe_answers(model, model.tokenizer, [ProbeItem(prompt, "abc")], max_new_tokens=20) == [
        brute_force_greedy(model, prompt, 20)]
    with pytest.raises(ValueError, match="context window"):
        probe_answers(model, model.tokenizer, [ProbeItem("y" * 64, "abc")])


def test_score_probe_counts_per_kind_what_is_correct_says_of_the_reference(model):
    greedy = [brute_force_greedy(model, p, 8) for p in PROMPTS]
    items = []
    for i, (prompt, text) in enumerate(zip(PROMPTS, greedy)):
        # half the items answered by the model's own greedy start (correct unless a letter follows), half not
        answer = text[:3] if i % 2 == 0 and text[:3].strip() else "never-said"
        items.append(ProbeItem(prompt, answer, kind="facts" if i < 5 else "general"))
    scores = score_probe(model, model.tokenizer, items, max_new_tokens=8, batch_size=4)
    assert list(scores) == ["facts", "general", "all"]
    for kind in ("facts", "general", "all"):
        chosen = [(item, g) for item, g in zip(items, greedy) if kind in ("all", item.kind)]
        correct = sum(is_correct(item.answer, g) for item, g in chosen)
        assert scores[kind] == {"correct": correct, "total": len(chosen), "accuracy": correct / len(chosen)}
    assert scores["all"]["correct"] >= 1  # the probe tells right from wrong
    assert scores["all"]["correct"] < scores["all"]["total"]


def test_scoring_restores_the_model_mode_and_reports_each_item(model):
    model.train()
    seen = []
    probe_answers(model, model.tokenizer, [ProbeItem(p, "ab") for p in PROMPTS[:5]], batch_size=2,
                  on_item=lambda done, total: seen.append((done, total)))
    assert model.training
    model.eval()
    assert seen == [(i, 5) for i in range(1, 6)]
    assert probe_answers(model, model.tokenizer, []) == []


@pytest.mark.parametrize("answer, generated, expected", [
    ("4", "4", True),
    ("4", " 4", True),
    ("4", "42", False),
    ("4", "4.", True),
    ("4", "4 apples", True),
    ("4", "\n\t 4\n", True),
    (" Paris ", "paris, of course", True),
    ("Paris", "PARIS", True),
    ("Paris", "Parisian", False),
    ("Paris", "Pari", False),
    ("Paris", "The answer is Paris", False),
    ("Oransk.", "Oransk.\nThe", True),
    ("3.5", "3.50", False),
    ("3.5", "3.5%", True),
    ("Zürich", "ZÜRICH!", True),
    ("Zürich", "Züriché", False),
    ("Paris", "", False),
    ("x", "x٣", False),  # an Arabic-Indic digit is a digit
])
def test_is_correct(answer, generated, expected):
    assert is_correct(answer, generated) is expected


def test_is_correct_refuses_an_empty_answer():
    with pytest.raises(ValueError, match="empty"):
        is_correct("  ", "anything")


def test_parse_probe_reads_items_and_skips_blank_lines():
    text = ('{"prompt": "2 + 2 =", "answer": "4", "kind": "arithmetic"}\n\n'
            '  \r\n{"prompt": "The capital of France is", "answer": " Paris"}\r\n')
    assert parse_probe(text) == [ProbeItem("2 + 2 =", "4", "arithmetic"),
                                 ProbeItem("The capital of France is", " Paris", "general")]
    assert parse_probe("\ufeff" + json.dumps({"prompt": "a\u2028b", "answer": "c"})) == [ProbeItem("a\u2028b", "c")]


@pytest.mark.parametrize("text, message", [
    ("", "holds no item"),
    ("\n  \n", "holds no item"),
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a", ', r"line 2: invalid JSON"),
    ('["a", "b"]', "line 1: expected an object"),
    ('{"answer": "b"}', 'line 1: "prompt" is missing'),
    ('{"prompt": "a"}', 'line 1: "answer" is missing'),
    ('{"prompt": "a", "answer": "  "}', 'line 1: "answer" is empty'),
    ('{"prompt": "", "answer": "b"}', 'line 1: "prompt" is empty'),
    ('{"prompt": "a", "answer": 4}', 'line 1: "answer" must be a string, got int'),
    ('{"prompt": "a", "answer": "b", "kind": null}', 'line 1: "kind" must be a string'),
    ('{"prompt": "a", "answer": "b", "Kind": "facts"}', r"line 1: unknown field\(s\) \['Kind'\]"),
    ('{"prompt": "a", "answer": "b", "kind": "all"}', 'line 1: "kind" must be'),
    ('{"prompt": "a", "answer": "b", "kind": "' + "k" * 65 + '"}', 'line 1: "kind" must be a label of at most 64'),
    ('{"prompt": "a", "answer": "b", "kind": "fa\\u0000cts"}', 'line 1: "kind" must be a label'),
    ('{"prompt": "\\ud800", "answer": "b"}', 'line 1: "prompt" is not valid Unicode'),
])
def test_parse_probe_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_probe(text)


def test_parse_probe_limits_the_items():
    line = '{"prompt": "a", "answer": "b"}\n'
    assert len(parse_probe(line * 3, max_items=3)) == 3
    with pytest.raises(ValueError, match="line 4: the probe holds more than 3 items"):
        parse_probe(line * 4, max_items=3)


def test_load_probe(tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_text('{"prompt": "a", "answer": "b", "kind": "facts"}\n', encoding="utf-8")
    assert load_probe(path) == [ProbeItem("a", "b", "facts")]
    path.write_bytes(b'{"prompt": "\xff", "answer": "b"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_probe(path)
