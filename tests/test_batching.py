"""Continuous batching: sequences of different lengths decoded together give what each gives alone."""
import random

import pytest
import torch

from peer_model.batching import BatchDecoder
from peer_model.generate import SamplingParams, generate
from peer_model.model import KVCache
from peer_model.tokenizer import BOS
from test_generate import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_seq_len=64, seed=3)


def test_a_ragged_decode_step_equals_each_row_decoded_alone(model):
    prompts = [[BOS, 104, 105], [BOS, *range(97, 117)], [BOS, 120]]
    singles, caches = [], []
    for prompt in prompts:
        cache = model.new_cache(1)
        model(torch.tensor([prompt]), cache)
        caches.append(cache)
        singles.append(model(torch.tensor([[33]]), cache)[0, -1])  # one decode step alone
    batch = model.new_cache(len(prompts))
    batch.lengths = torch.zeros(len(prompts), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        view = KVCache(batch.keys[:, row : row + 1], batch.values[:, row : row + 1])
        model(torch.tensor([prompt]), view)
        batch.lengths[row] = len(prompt)
    together = model(torch.tensor([[33]] * len(prompts)), batch)[:, -1]
    torch.testing.assert_close(together, torch.stack(singles), rtol=1e-5, atol=1e-5)
    assert batch.lengths.tolist() == [len(p) + 1 for p in prompts]


def requests(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(97, 123) for _ in range(rng.choice([1, 5, 17, 40]))]
        params = SamplingParams(max_tokens=rng.choice([3, 12, 30, 60]), temperature=rng.choice([0.0, 0.9, 1.3]),
                                top_k=rng.choice([0, 20]), stop=rng.choice([(), ("e",), ("ab", "q")]), seed=1000 + i)
        out.append((prompt, params))
    return out


def alone(model, prompt, params):
    return [(s.token_id, s.text, s.finish_reason) for s in generate(model, prompt, params)]


def test_continuous_batching_gives_each_sequence_its_own_completion(model):
    todo = requests(9)
    prompt, params = todo[0]  # make one stop string certain: a piece of that sequence's own completion
    text = "".join(step[1] for step in alone(model, prompt, SamplingParams(max_tokens=40, seed=params.seed)))
    todo[0] = (prompt, SamplingParams(max_tokens=40, seed=params.seed, stop=(text[10:12],)))
    expected = [alone(model, p, params) for p, params in todo]
    decoder = BatchDecoder(model, capacity=4)
    got: dict[int, list] = {}
    owner = {}
    waiting = list(enumerate(todo))
    while waiting or len(decoder):
        while waiting and len(decoder) < decoder.capacity:  # new sequences join a running batch
            index, (prompt, params) = waiting.pop(0)
            owner[decoder.add(prompt, params)] = index
        for sequence, step in decoder.step():
            got.setdefault(owner[sequence], []).append((step.token_id, step.text, step.finish_reason))
    assert [got[i] for i in range(len(todo))] == expected
    reasons = {steps[-1][2] for steps in expected}
    assert {"length", "stop"} <= reasons  # budgets (one at the context window) and stop strings both ended some


def test_a_removed_sequence_frees_its_row_and_leaves_the_others_unchanged(model):
    todo = requests(3, seed=5)
    todo = [(p, SamplingParams(max_tokens=20, temperature=0.9, seed=params.seed)) for p, params in todo]
    expected = [alone(model, p, params) for p, params in todo]
    decoder = BatchDecoder(model, capacity=3)
    sequences = [decoder.add(p, params) for p, params in todo]
    got = {0: [], 1: [], 2: []}
    for round_ in range(20):
        if round_ == 2:
            decoder.remove(sequences[1])  # the middle row: the last one moves into its slot
            assert len(decoder) == 2 and sequences[2].slot == 1
        for sequence, step in decoder.step():
            got[sequences.index(sequence)].append((step.token_id, step.text, step.finish_reason))
    assert got[0] == expected[0] and got[2] == expected[2] and got[1] == expected[1][:2]
    assert len(decoder) == 0


def test_add_refuses_overlong_prompts_and_a_full_batch(model):
    decoder = BatchDecoder(model, capacity=1)
    with pytest.raises(ValueError, match="does not fit the context window"):
        decoder.add([97] * 64, SamplingParams())
    decoder.add([97], SamplingParams(max_tokens=5))
    with pytest.raises(RuntimeError, match="all 1 rows are running"):
        decoder.add([97], SamplingParams())


def run_all(decoder: BatchDecoder, todo, admit_every: int = 2) -> dict[int, list]:
    """Admit a new request every ``admit_every`` steps while rows are free; run until all finish."""
    got: dict[int, list] = {}
    owner: dict[int, int] = {}
    queue, step = list(enumerate(todo)), 0
    while queue or len(decoder):
        if queue and len(decoder) < decoder.capacity and step % admit_every == 0:
            index, (prompt, params) = queue.pop(0)
            owner[id(decoder.add(prompt, params))] = index
        for sequence, emitted in decoder.step():
            got.setdefault(owner[id(sequence)], []).append((emitted.token_id, emitted.text, emitted.finish_reason))
        step += 1
    return got


def test_the_padded_fixed_shape_step_of_cuda_graphs_decodes_what_the_ragged_step_does(model):
    """The CUDA-graph path pads n running rows up to a bucket (1, 2, 4, 8) at a fixed attention span; on
    CPU it runs eagerly. Greedy completions and the counted expert usage must not change: the padding
    rows write only into free cache rows and their selections are taken back out."""
    todo = [(prompt, SamplingParams(max_tokens=params.max_tokens, temperature=0.0)) for prompt, params in requests(11)]
    layer = model.peer_layers()[1]
    results, usage = [], []
    for graphs in (False, True):
        layer.reset_usage()
        layer.track_usage = True
        try:
            results.append(run_all(BatchDecoder(model, capacity=6, cuda_graphs=graphs), todo))
        finally:
            layer.track_usage = False
        usage.append(layer.usage_counts.clone())
    assert results[0] == results[1]
    assert torch.equal(usage[0], usage[1]) and int(usage[0].sum()) > 0


def test_short_cache_rows_give_the_same_completions_and_refuse_what_does_not_fit(model):
    todo = [(p, SamplingParams(max_tokens=n, temperature=0.0)) for p, n in [([104, 105], 9), ([97] * 17, 5), ([120], 12)]]
    needed = 17 + 1 + 5 - 1  # the longest context (BOS + prompt) and the tokens fed after it
    decoder = BatchDecoder(model, capacity=4, max_len=needed)
    assert decoder.cache.keys.shape[3] == needed
    owner = {decoder.add(p, params): i for i, (p, params) in enumerate(todo)}
    got: dict[int, list] = {}
    while len(decoder):
        for sequence, step in decoder.step():
            got.setdefault(owner[sequence], []).append((step.token_id, step.text, step.finish_reason))
    assert [got[i] for i in range(len(todo))] == [alone(model, p, params) for p, params in todo]
    with pytest.raises(ValueError, match=f"needs {needed + 1} cache positions"):
        decoder.add([97] * (needed - 1), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="max_len must be in"):
        BatchDecoder(model, capacity=1, max_len=65)
