"""Continual training: freezing keeps old experts bit-identical, protection forgets less than naive
fine-tuning, replay mixes the asked fraction, sparse finetuning trains only its experts; fact probes."""
import copy
import math
import types
from dataclasses import replace

import pytest
import torch
from torch import nn

from fake_lm import FakeLM
from peer_model.config import ModelConfig, PEERConfig
from peer_model.continual import (
    BatchSparseSelection, ContinualOptions, MixedData, background_frequency, continual_stage, evaluate_all,
    expert_scores, forget_segments, forgetting_report, sample_replay, select_experts, selection_share,
)
from peer_model.facts import answer_bits, fact_recall, facts_text, facts_tokens, make_facts, recalled
from peer_model.model import PEERTransformer
from peer_model.tokenizer import BOS, EOS, ByteTokenizer
from peer_model.train import TokenData, build_optimizers, evaluate_bpb, train
from test_train import DATA, VAL, grammar_text, small_cfg, tiny_model


# domain B: other bytes (capitals, digits, punctuation) than test_train's lower-case grammar
CODE_GRAMMAR = (["ZORK-", "QUAX-", "VYPH-", "KLUD-"], ["9X7", "42Q", "J0K", "W5Z"], ["#!;", "$$;", "%@;", "&*;"])
DATA_B = TokenData.from_text(grammar_text(800, seed=0, grammar=CODE_GRAMMAR))
VAL_B = TokenData.from_text(grammar_text(100, seed=1, grammar=CODE_GRAMMAR))
FAST = dict(lr=1e-2, expert_lr=1e-2, warmup_steps=5, log_every=20)


def stage_cfg(steps: int = 60):
    return small_cfg(steps=steps, **FAST)


@pytest.fixture(scope="module")
def parent():
    """A tiny model trained on domain A (test_train's grammar)."""
    model = tiny_model(num_experts=16 * 16)
    train(model, DATA, None, small_cfg(steps=150, lr=1e-2, expert_lr=1e-2, warmup_steps=15, log_every=50))
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- (a) grow + freeze keeps the old experts and sub-keys bit-identical ----------------------------


def test_grow_freeze_keeps_old_experts_sub_keys_and_batchnorm_bit_identical(parent):
    before = snapshot(parent)
    options = ContinualOptions("grow_freeze", new_experts=16 * 16, freeze_old_sub_keys=True,
                               freeze_query_batchnorm_stats=True, train=stage_cfg(30))
    result = continual_stage(parent, DATA_B, [DATA], options, tag="B")
    old, new = parent.peer_layers()[1], result.child.peer_layers()[1]
    n, rows, cols = old.num_experts, old.grid.rows, old.grid.cols
    assert result.segments[1].tag == "B" and new.num_experts > n
    for name in ("expert_down", "expert_up"):
        assert torch.equal(getattr(new, name)[:n], getattr(old, name)), name
    assert new.expert_up[n:].abs().sum() > 0, "the new experts must learn"
    assert torch.equal(new.sub_keys1[:rows], old.sub_keys1) and torch.equal(new.sub_keys2[:cols], old.sub_keys2)
    assert not torch.equal(new.sub_keys1[rows:], new.sub_keys1.new_zeros(1).expand_as(new.sub_keys1[rows:]))
    assert torch.equal(new.query_norm.running_mean, old.query_norm.running_mean)
    assert torch.equal(new.query_norm.running_var, old.query_norm.running_var)
    assert not torch.equal(new.query.weight, old.query.weight), "routing trains"
    assert torch.equal(result.child.embed.weight, parent.embed.weight), "dense parameters frozen by default"
    assert torch.equal(result.child.blocks[0].ffw.up.weight, parent.blocks[0].ffw.up.weight)
    # the parent is untouched, the child is left fully trainable and in no special mode
    assert all(torch.equal(v, parent.state_dict()[k]) for k, v in before.items())
    assert bool(new.trainable.all()) and all(p.requires_grad for p in result.child.parameters())
    assert "train" not in vars(new.query_norm)


def test_without_the_switches_old_sub_keys_and_batchnorm_statistics_move(parent):
    options = ContinualOptions("grow_freeze", new_experts=16 * 16, train=stage_cfg(20))
    new = continual_stage(parent, DATA_B, [DATA], options).child.peer_layers()[1]
    old = parent.peer_layers()[1]
    assert not torch.equal(new.sub_keys1[: old.grid.rows], old.sub_keys1)
    assert not torch.equal(new.query_norm.running_mean, old.query_norm.running_mean)
    assert torch.equal(new.expert_up[: old.num_experts], old.expert_up)


# ---- (b) protection forgets less than naive fine-tuning ------------------------------------------


def test_grow_freeze_and_protection_forget_less_of_domain_a_than_naive(parent):
    """A then B with equal steps: increase of A's validation bpb. Measured (seeded): naive +17,
    grow_freeze (old sub-keys, BatchNorm statistics frozen) +2.6, + replay 25% & distillation +0.05."""
    a0 = evaluate_bpb(parent, VAL, 32, 8)
    b0 = evaluate_bpb(parent, VAL_B, 32, 8)
    keep = dict(freeze_old_sub_keys=True, freeze_query_batchnorm_stats=True)
    runs = {
        "naive": ContinualOptions("naive", train=stage_cfg()),
        "grow_freeze": ContinualOptions("grow_freeze", new_experts=16 * 16, train=stage_cfg(), **keep),
        "protect": ContinualOptions("grow_freeze_protect", new_experts=16 * 16, replay_fraction=0.25,
                                    distill_weight=1.0, train=stage_cfg(), **keep),
    }
    forgot, b_after = {}, {}
    for name, options in runs.items():
        child = continual_stage(parent, DATA_B, [DATA], options, tag="B").child
        bpb = evaluate_all(child, {"A": VAL, "B": VAL_B}, 32, 8)
        forgot[name], b_after[name] = bpb["A"] - a0, bpb["B"]
    assert forgot["naive"] > 3.0, forgot
    assert forgot["grow_freeze"] < 0.5 * forgot["naive"], forgot
    assert forgot["protect"] < 0.5 * forgot["grow_freeze"] and forgot["protect"] < 0.3, forgot
    assert all(b < b0 - 0.5 for b in b_after.values()), (b0, b_after)  # every strategy learned some of B
    assert b_after["naive"] < min(b_after["grow_freeze"], b_after["protect"])  # the price: plasticity


# ---- (c) replay mixing ---------------------------------------------------------------------------


def test_replay_draws_the_asked_fraction_from_old_corpora_uniformly():
    new = TokenData.from_text("a" * 500)
    old = [TokenData.from_text("b" * 500), TokenData.from_text("c" * 500)]
    mix = MixedData(new, old, 0.25)
    generator = torch.Generator().manual_seed(0)
    firsts = torch.cat([mix.sample_batch(32, 16, generator)[1][:, 0] for _ in range(200)])  # 6,400 windows
    share = {ch: float((firsts == ord(ch)).float().mean()) for ch in "abc"}
    # binomial standard deviation of the old share: sqrt(.25 * .75 / 6400) = 0.0054
    assert abs(share["b"] + share["c"] - 0.25) < 0.025, share
    assert abs(share["b"] - share["c"]) < 0.03, share
    inputs, targets, source = mix.sample_batch(64, 16, torch.Generator().manual_seed(1))
    expected = torch.tensor([ord("a"), ord("b"), ord("c")])[source + 1]
    assert torch.equal(targets[:, 0], expected) and torch.equal(targets[:, -1], expected)
    a = MixedData(new, old, 0.25).sample_batch(8, 16, torch.Generator().manual_seed(3))
    b = MixedData(new, old, 0.25).sample_batch(8, 16, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    none = MixedData(new, old, 0.0).sample_batch(64, 16, generator)[1]
    assert bool((none == ord("a")).all())
    with pytest.raises(ValueError):
        MixedData(new, [], 0.5)


# ---- (d) facts -----------------------------------------------------------------------------------


def test_facts_are_deterministic_and_distinct_across_stages():
    assert make_facts(2, 50, seed=7) == make_facts(2, 50, seed=7)
    assert make_facts(2, 50, seed=7) != make_facts(2, 50, seed=8)
    stages = [make_facts(s, 300, seed=0) for s in range(4)]
    prompts = [f.prompt for facts in stages for f in facts]
    assert len(set(prompts)) == len(prompts) == 1200
    assert len({f.template for f in stages[0]}) >= 5
    fact = stages[1][0]
    assert fact.stage == 1 and fact.answer.startswith(" ") and fact.answer.endswith(".")
    assert fact.sentence == fact.prompt + fact.answer and fact.subject in fact.prompt
    text = facts_text(stages[0][:10], repeats=3)
    assert all(text.count(f.sentence + "\n") == 3 for f in stages[0][:10])
    assert text.count("\n") == 30
    tokens = facts_tokens(stages[0][:10], repeats=3)
    assert int((tokens == 256).sum()) == 30 and tokens[0] == 256
    with pytest.raises(ValueError):
        make_facts(-1, 10)


class ForcingModel(FakeLM):
    """Stand-in language model: its logits force the continuation of the known sentence the context
    starts (``wrong``: always '#'). Works with and without the generation KV cache."""

    tokenizer = ByteTokenizer()

    def __init__(self, sentences: list[str], wrong: bool = False):
        super().__init__()
        self.config = ModelConfig(d_model=8, n_layers=1, n_heads=1, d_ff=8, max_seq_len=64)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.sentences = [s.encode() for s in sentences]
        self.wrong = wrong

    def new_cache(self, batch, max_len=None):
        return types.SimpleNamespace(length=0, tokens=[])

    def next_id(self, context: list[int]) -> int:
        if self.wrong:
            return ord("#")
        text = bytes(t for t in context if t < 256)
        return next((s[len(text)] for s in self.sentences if s.startswith(text) and len(s) > len(text)), EOS)

    def forward(self, tokens, cache=None):
        B, T = tokens.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            history = (cache.tokens if cache is not None else []) + tokens[b].tolist()
            offset = len(history) - T
            for t in range(T):
                logits[b, t, self.next_id(history[: offset + t + 1])] = 10.0
        if cache is not None:
            cache.tokens, cache.length = history, cache.length + T
        return logits


@pytest.mark.parametrize("method", ["batched", "generate"])
def test_fact_recall_is_one_for_a_model_that_knows_and_zero_for_one_that_does_not(method):
    facts = make_facts(0, 12)
    knows = ForcingModel([f.sentence for f in facts])
    assert fact_recall(knows, facts, ByteTokenizer(), batch_size=5, method=method) == 1.0
    assert fact_recall(ForcingModel([], wrong=True), facts, method=method) == 0.0
    half = ForcingModel([f.sentence for f in facts[:6]])  # the rest: EOS right after the prompt
    assert fact_recall(half, facts, method=method) == 0.5


@pytest.fixture(scope="module")
def fact_model():
    """A tiny model trained on the 6 facts of stage 0 (and nothing else)."""
    facts = make_facts(0, 6)
    model = tiny_model()
    data = TokenData(facts_tokens(facts, repeats=40))  # BOS before each sentence, as in the prompts
    train(model, data, None, small_cfg(steps=150, seq_len=48, lr=1e-2, expert_lr=1e-2, warmup_steps=10, log_every=50))
    return model, facts


def test_batched_recall_agrees_with_greedy_generation_on_a_trained_model(fact_model):
    model, facts = fact_model
    probes = facts + make_facts(1, 3)  # 3 facts it never saw: some probes must fail
    batched = recalled(model, probes, batch_size=4)
    generated = [fact_recall(model, [f], method="generate") == 1.0 for f in probes]
    assert batched == generated
    assert any(batched) and not all(batched), batched


def test_answer_bits_equal_an_unpadded_forward_per_fact_and_separate_seen_from_unseen_facts(fact_model):
    model, facts = fact_model
    unseen = make_facts(1, 6)
    probes = facts + unseen
    bits = answer_bits(model, probes, batch_size=4)  # rows of different lengths share a padded batch
    model.eval()
    tokenizer = ByteTokenizer()
    for fact, got in zip(probes, bits):
        prompt, answer = tokenizer.encode(fact.prompt), tokenizer.encode(fact.answer)
        with torch.no_grad():
            logits = model(torch.tensor([[BOS, *prompt, *answer[:-1]]]))[0, len(prompt):]
        log_probs = torch.log_softmax(logits.double(), -1)
        expected = -sum(float(log_probs[i, a]) for i, a in enumerate(answer)) / len(answer) / math.log(2)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert max(bits[:6]) < min(bits[6:]), "a fact it was trained on costs fewer bits than any it never saw"


# ---- (e) sparse finetuning -----------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["stage", "batch"])
def test_sparse_finetune_trains_only_the_selected_experts(parent, selection):
    options = ContinualOptions("sparse_finetune", sparse_top_experts=24, sparse_selection=selection,
                               train=stage_cfg(30))
    result = continual_stage(parent, DATA_B, [DATA], options)
    old, new = parent.peer_layers()[1], result.child.peer_layers()[1]
    selected = result.trained_experts[1]
    assert 0 < selected.numel() <= (24 if selection == "stage" else 24 * 30)
    others = torch.ones(old.num_experts, dtype=torch.bool)
    others[selected] = False
    for name in ("expert_down", "expert_up"):
        assert torch.equal(getattr(new, name)[others], getattr(old, name)[others]), name
    changed = (new.expert_up[selected] != old.expert_up[selected]).any(dim=1)
    assert changed.any(), "the selected experts must train"
    # with growth: the new experts train as well
    grown_result = continual_stage(parent, DATA_B, [DATA], ContinualOptions(
        "sparse_finetune", sparse_top_experts=24, new_experts=16 * 16, sparse_selection=selection,
        train=stage_cfg(20)))
    grown = grown_result.child.peer_layers()[1]
    others = torch.ones(old.num_experts, dtype=torch.bool)
    others[grown_result.trained_experts[1][grown_result.trained_experts[1] < old.num_experts]] = False
    assert torch.equal(grown.expert_up[: old.num_experts][others], old.expert_up[others])
    assert grown.expert_up[old.num_experts:].abs().sum() > 0


def test_per_batch_selection_keeps_only_the_gradient_rows_of_the_batchs_best_tf_idf_experts(parent):
    model = copy.deepcopy(parent)
    layer = model.peer_layers()[1]
    idf = background_frequency(model, DATA_B, [DATA], batches=4, batch_size=8, seq_len=32)
    selection = BatchSparseSelection(model, idf, top=10)
    layer.track_usage = True
    inputs, targets = DATA_B.sample_batch(8, 32, torch.Generator().manual_seed(4))
    torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
    counts = layer.usage_counts.clone().double()
    used = set(layer.expert_up.grad.coalesce().indices()[0].tolist())
    selection()
    scores = (counts / counts.sum() * idf[1]).tolist()
    best = sorted((e for e in range(len(scores)) if scores[e] > 0), key=lambda e: (-scores[e], e))[:10]
    for table in (layer.expert_down, layer.expert_up):
        assert set(table.grad.coalesce().indices()[0].tolist()) == used & set(best)
    assert int(layer.usage_counts.sum()) == 0, "each step counts its own batch"


def test_tf_idf_scores_favour_experts_the_old_data_does_not_use(parent):
    scores = expert_scores(parent, DATA_B, [DATA], batches=4, batch_size=8, seq_len=32)[1]
    from peer_model.continual import MixedData
    from peer_model.continual.sparse import _count_usage
    # the old batches the IDF was taken on (expert_scores(seed=0) → background_frequency(seed=1))
    df = _count_usage(parent, MixedData(DATA_B, [DATA], 1.0), 4, 8, 32, torch.Generator().manual_seed(1),
                      per_batch=True)[1]
    assert bool((scores >= 0).all())
    assert bool((df == 4).any()) and scores[df == 4].max() < 1e-12, "used in every old batch: idf = 0"
    assert scores.max() > 0
    assert select_experts(torch.tensor([0.0, 3.0, 1.0, 3.0, -1.0]), 3).tolist() == [1, 3, 2]
    assert select_experts(torch.tensor([0.0, 2.0, 0.0]), 5).tolist() == [1]


def test_selection_share_counts_the_selections_that_land_on_grown_experts(parent):
    child = copy.deepcopy(parent)
    layer = child.peer_layers()[1]
    first = {1: layer.num_experts}
    child.grow(128, generator=torch.Generator().manual_seed(0))
    layer.open_new_segments(1.0)  # as training does: a grown segment is out of reach until opened
    generator = torch.Generator().manual_seed(3)
    new = total = 0
    child.eval()
    for _ in range(3):  # brute force: route the same sampled windows, count the ids
        inputs = DATA.sample_batch(8, 32, generator)[0]
        captured = []
        hook = layer.register_forward_hook(lambda module, args, out: captured.append(module.route(args[0].flatten(0, 1))[1]))
        with torch.no_grad():
            child(inputs)
        hook.remove()
        new += int((captured[0] >= first[1]).sum())
        total += captured[0].numel()
    share = selection_share(child, DATA, first, batches=3, batch_size=8, seq_len=32, seed=3)
    assert share == pytest.approx(new / total)
    assert share < 0.5, "new sub-keys start small: old text mostly keeps its old experts"
    with torch.no_grad():
        layer.sub_keys1[parent.peer_layers()[1].grid.rows:] *= 100  # new rows now win most heads' top-k
    assert selection_share(child, DATA, first, batches=3, batch_size=8, seq_len=32, seed=3) > 0.75


# ---- evaluation ----------------------------------------------------------------------------------


def test_forgetting_report():
    R = [[2.0, None, None],
         [2.5, 3.0, None],
         [2.8, 3.5, 1.0]]
    naive = [[2.0, None, None], [4.0, 2.5, None], [5.0, 4.0, 0.5]]
    report = forgetting_report(R, reference=naive)
    assert report["forgetting"] == {0: pytest.approx(0.8), 1: pytest.approx(0.5)}
    assert report["average_forgetting"] == pytest.approx(0.65)
    assert report["learning"] == {0: 2.0, 1: 3.0, 2: 1.0}
    assert report["plasticity"] == pytest.approx((0.5 + 0.5) / 2), "the base corpus (stage 0) is not counted"
    assert report["relative_plasticity"] == pytest.approx((3.0 / 2.5 + 1.0 / 0.5) / 2 - 1)
    assert forgetting_report([[1.0]])["average_forgetting"] is None
    with pytest.raises(ValueError):
        forgetting_report([[1.0], [1.0, 2.0]])


# ---- (f) options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(strategy="lora"),
    dict(strategy="grow_freeze", new_experts=0),
    dict(strategy="grow_freeze", new_experts=4, replay_fraction=0.2),
    dict(strategy="naive", distill_weight=1.0, distill_on="all"),
    dict(strategy="replay", replay_fraction=0.0),
    dict(strategy="replay", replay_fraction=1.0),
    dict(strategy="replay", replay_fraction=-0.1),
    dict(strategy="grow_freeze_protect", new_experts=4),
    dict(strategy="grow_freeze_protect", new_experts=4, distill_weight=1.0),  # old text needs replay
    dict(strategy="grow_freeze_protect", new_experts=4, distill_weight=float("nan"), replay_fraction=0.1),
    dict(strategy="grow_freeze_protect", new_experts=4, distill_weight=1.0, distill_on="new"),
    dict(strategy="sparse_finetune"),
    dict(strategy="naive", sparse_top_experts=4),
    dict(strategy="naive", new_experts=-1),
    dict(strategy="sparse_finetune", sparse_top_experts=4, usage_batches=0),
    dict(strategy="naive", train={"steps": 10}),
    dict(strategy="naive", old_lr_scale=1.5), dict(strategy="naive", old_lr_scale=-0.1),
    dict(strategy="naive", review_steps=-1),
])
def test_options_reject_invalid_values(bad):
    with pytest.raises(ValueError):
        ContinualOptions(**bad)


def test_stage_rejects_replay_without_old_corpora_and_overlong_windows(parent):
    with pytest.raises(ValueError, match="earlier corpora"):
        continual_stage(parent, DATA_B, [], ContinualOptions("replay", replay_fraction=0.5, train=stage_cfg(2)))
    with pytest.raises(ValueError, match="max_seq_len"):
        continual_stage(parent, DATA_B, [], ContinualOptions("naive", train=small_cfg(seq_len=65)))


def test_options_accept_the_documented_combinations():
    ContinualOptions("naive")
    ContinualOptions("naive", new_experts=16)
    ContinualOptions("replay", replay_fraction=0.3, distill_weight=0.5)
    ContinualOptions("grow_freeze_protect", new_experts=16, distill_weight=1.0, distill_on="all")
    ContinualOptions("sparse_finetune", sparse_top_experts=8, new_experts=16, replay_fraction=0.1)
    assert ContinualOptions("naive").dense_trains and not ContinualOptions("grow_freeze", new_experts=1).dense_trains


# ---- add and chill, router review, forgetting on request ----------------------------------------


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_add_and_chill_at_rate_zero_trains_only_the_new_experts_and_sub_keys(parent):
    options = ContinualOptions("naive", new_experts=64, old_lr_scale=0.0, freeze_old_sub_keys=True, train=stage_cfg(20))
    child = continual_stage(parent, DATA_B, [DATA], options, tag="B").child
    old, new = parameters(parent), parameters(child)
    n = parent.peer_layers()[1].num_experts
    for name, value in old.items():
        if name.endswith(("expert_down", "expert_up", "sub_keys1", "sub_keys2")):
            assert torch.equal(new[name][: value.shape[0]], value), name
        else:
            assert torch.equal(new[name], value), name
    assert child.peer_layers()[1].expert_up[n:].abs().sum() > 0, "the new experts must learn at the full rate"


def test_add_and_chill_at_rate_zero_holds_old_sub_keys_and_batchnorm_statistics_without_other_switches(parent):
    options = ContinualOptions("naive", new_experts=64, old_lr_scale=0.0, train=stage_cfg(10))
    child = continual_stage(parent, DATA_B, [DATA], options, tag="B").child
    old, new = parent.peer_layers()[1], child.peer_layers()[1]
    assert torch.equal(new.sub_keys1[: old.grid.rows], old.sub_keys1)
    assert torch.equal(new.sub_keys2[: old.grid.cols], old.sub_keys2)
    assert not torch.equal(new.sub_keys1[old.grid.rows :], torch.zeros_like(new.sub_keys1[old.grid.rows :]))
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(new.query_norm, name), getattr(old.query_norm, name)), name
    assert new.query_norm.momentum == old.query_norm.momentum  # restored after the stage


def test_a_per_row_rate_scales_each_rows_adamw_update_exactly():
    """Optimizers' row rates against a reference: AdamW on the same gradients at each row's own rate."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4, bias=False)  # a weight matrix: AdamW decays it
    weight = model.weight
    reference = [nn.Parameter(weight.detach()[i : i + 1].clone()) for i in range(4)]
    rates = torch.tensor([1.0, 0.5, 0.1, 0.0])
    optimizers = build_optimizers(model, small_cfg(lr=0.1, weight_decay=0.1), {id(weight): rates})
    adams = [torch.optim.AdamW([p], lr=0.1 * float(r), betas=small_cfg().betas, weight_decay=0.1)
             for p, r in zip(reference, rates)]
    for step in range(3):
        grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        weight.grad = grad.clone()
        optimizers.step()
        for i, (p, adam) in enumerate(zip(reference, adams)):
            p.grad = grad[i : i + 1].clone()
            adam.step()
    assert torch.allclose(weight.detach(), torch.cat([p.detach() for p in reference]), atol=1e-6, rtol=0)


def test_add_and_chill_moves_old_parameters_less_than_plain_training(parent):
    def dense_change(scale):
        options = ContinualOptions("naive", new_experts=64, old_lr_scale=scale, train=stage_cfg(20))
        child = continual_stage(parent, DATA_B, [DATA], options, tag="B").child
        return (child.blocks[0].ffw.up.weight - parent.blocks[0].ffw.up.weight).abs().mean().item()
    assert dense_change(0.1) < 0.5 * dense_change(1.0)


def test_a_stage_depends_on_its_seed_not_on_what_ran_before(parent):
    """Growth draws from the stage's seed: two runs of one arm agree whatever the global generator holds,
    and another seed grows other experts."""
    def child(global_seed, seed=0):
        torch.manual_seed(global_seed)
        options = ContinualOptions("replay", new_experts=64, replay_fraction=0.5, train=replace(stage_cfg(5), seed=seed))
        return parameters(continual_stage(parent, DATA_B, [DATA], options, tag="B").child)
    first, second, other = child(1), child(2), child(1, seed=9)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["blocks.1.ffw.sub_keys1"], other["blocks.1.ffw.sub_keys1"])


ROUTING = ("query.weight", "query_norm.weight", "query_norm.bias", "sub_keys1", "sub_keys2")


def test_router_review_changes_only_the_routing(parent):
    def stage(review_steps):
        options = ContinualOptions("replay", new_experts=64, replay_fraction=0.5, distill_weight=1.0,
                                   review_steps=review_steps, train=stage_cfg(20))
        return continual_stage(parent, DATA_B, [DATA], options, tag="B")
    plain, reviewed = stage(0), stage(10)
    assert any(record.get("review") for record in reviewed.train_result.history)
    a, b = parameters(plain.child), parameters(reviewed.child)
    changed = {name for name in a if not torch.equal(a[name], b[name])}
    assert changed and all(name.endswith(ROUTING) for name in changed), changed


def test_router_review_keeps_a_frozen_query_frozen(parent):
    options = ContinualOptions("replay", new_experts=64, replay_fraction=0.5, freeze_query=True, review_steps=10,
                               train=stage_cfg(10))
    child = continual_stage(parent, DATA_B, [DATA], options, tag="B").child
    old, new = parameters(parent), parameters(child)
    for name in ("blocks.1.ffw.query.weight", "blocks.1.ffw.query_norm.weight", "blocks.1.ffw.query_norm.bias"):
        assert torch.equal(new[name], old[name]), name
    rows = parent.peer_layers()[1].grid.rows
    assert not torch.equal(new["blocks.1.ffw.sub_keys1"][:rows], old["blocks.1.ffw.sub_keys1"])  # the review ran


def segment_only_child(parent):
    """Only the new segment (experts and sub-keys) trains: masking it must give back the parent."""
    options = ContinualOptions("grow_freeze", new_experts=16 * 16, freeze_old_sub_keys=True,
                               freeze_query_batchnorm_stats=True, freeze_query=True, train=stage_cfg(40))
    return continual_stage(parent, DATA_B, [DATA], options, tag="B").child


def test_forgetting_a_segment_gives_back_the_parent_when_only_the_segment_trained(parent):
    child = segment_only_child(parent)
    assert evaluate_bpb(child, VAL_B, 32, 8) < evaluate_bpb(parent, VAL_B, 32, 8) - 0.05, "B must be learnt first"
    forgotten, repair = forget_segments(child, {1: [1]}, [DATA])
    assert repair is None and [s.status for s in forgotten.peer_layers()[1].segments] == ["active", "masked"]
    assert child.peer_layers()[1].segments[1].status == "active", "the parent of the forgetting is unchanged"
    inputs = VAL_B.sample_batch(4, 32, torch.Generator().manual_seed(0))[0]
    parent.eval(), forgotten.eval()
    with torch.no_grad():
        torch.testing.assert_close(forgotten(inputs), parent(inputs), atol=1e-5, rtol=0)


def test_forgetting_with_repair_trains_on_the_remaining_corpora_and_keeps_the_segment_out(parent):
    child = segment_only_child(parent)
    forgotten, repair = forget_segments(child, {1: [1]}, [DATA], repair_steps=10, train_cfg=stage_cfg(10))
    assert repair is not None and repair.steps_done == 10
    layer, n = forgotten.peer_layers()[1], parent.peer_layers()[1].num_experts
    assert torch.equal(layer.expert_up[n:], child.peer_layers()[1].expert_up[n:]), "masked experts cannot change"
    assert not torch.equal(forgotten.blocks[0].ffw.up.weight, child.blocks[0].ffw.up.weight)
    ids = layer.route(torch.randn(256, 64))[1]
    assert not bool((ids >= n).any())


def test_forget_segments_rejects_the_initial_segment_and_unknown_layers(parent):
    grown = copy.deepcopy(parent)
    grown.grow(16)
    with pytest.raises(ValueError, match="initial segment"):
        forget_segments(grown, {1: [0]}, [])
    with pytest.raises(ValueError, match="no PEER layer"):
        forget_segments(grown, {0: [1]}, [])
    with pytest.raises(ValueError, match="remaining corpora"):
        forget_segments(grown, {1: [1]}, [], repair_steps=5)


def test_data_keyed_growth_sends_the_new_corpus_to_the_new_experts(parent):
    """With random new sub-keys the trained old ones mostly keep winning; keyed on the new corpus' queries,
    the new segment gets a real share of it (dense layers frozen, so routing is the only way to learn).
    One stage's share swings with its seed (random keys won 0-38% over seeds and parents), so the claim
    is checked on every one of four seeds and on their mean."""
    def share(key_init, seed):
        options = ContinualOptions("grow_freeze", new_experts=64, key_init=key_init, freeze_old_sub_keys=True,
                                   freeze_query_batchnorm_stats=True, train=replace(stage_cfg(30), seed=seed))
        child = continual_stage(parent, DATA_B, [DATA], options, tag="B").child
        first = {1: parent.peer_layers()[1].num_experts}
        return selection_share(child, VAL_B, first, batches=2, batch_size=8, seq_len=32)
    pairs = [(share("random", seed), share("data", seed)) for seed in range(5, 9)]
    assert all(data > random for random, data in pairs), pairs
    mean_random, mean_data = (sum(column) / len(pairs) for column in zip(*pairs))
    assert mean_data > max(0.2, 2 * mean_random), pairs


def test_data_keyed_growth_of_a_head_sliced_pool(parent):
    """MH-PEER (head_slices): the new sub-keys are keyed on the sub-tokens' queries, d / heads wide."""
    torch.manual_seed(0)
    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64, peer_layers=[1],
                         peer=PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16, head_slices=True))
    model = PEERTransformer(config)
    options = ContinualOptions("replay", new_experts=64, replay_fraction=0.5, key_init="data", train=stage_cfg(5))
    result = continual_stage(model, DATA_B, [DATA], options, tag="B")
    old, new = model.peer_layers()[1], result.child.peer_layers()[1]
    assert new.num_experts > old.num_experts and new.sub_keys1.shape[1] == 8
    assert torch.isfinite(new.sub_keys1).all() and torch.isfinite(new.sub_keys2).all()


# ---- generative replay ---------------------------------------------------------------------------


def test_generative_replay_samples_the_parents_own_distribution(parent):
    replay = sample_replay(parent, windows=12, seq_len=32, seed=3)
    assert len(replay) == 12 * 32
    assert torch.equal(replay.tokens, sample_replay(parent, windows=12, seq_len=32, seed=3).tokens)
    assert not bool(((replay.tokens == BOS) | (replay.tokens == ByteTokenizer.PAD)).any())
    # the parent knows domain A: its own samples read like A to it, not like B
    own = evaluate_bpb(parent, replay, 32, 4)
    assert own < evaluate_bpb(parent, VAL, 32, 8) + 1.0 < evaluate_bpb(parent, VAL_B, 32, 8)


def test_a_stage_can_replay_the_parents_samples_without_any_old_corpus(parent):
    options = ContinualOptions("replay", replay_fraction=0.5, distill_weight=1.0, replay_source="parent",
                               generated_windows=16, train=stage_cfg(30))
    protected = continual_stage(parent, DATA_B, [], options, tag="B").child
    naive = continual_stage(parent, DATA_B, [], ContinualOptions("naive", train=stage_cfg(30)), tag="B").child
    assert evaluate_bpb(protected, VAL, 32, 8) < evaluate_bpb(naive, VAL, 32, 8), "replaying the parent protects A"


def test_replaying_both_protects_what_the_parent_knew_that_no_old_corpus_holds(parent):
    """The parent knows A; the only earlier corpus is B (a pretrained base's jobs: its own text is in no corpus).
    Replaying B protects B; replaying the parent's samples too ("both") protects A as well."""
    def stage(source: str):
        options = ContinualOptions("replay", replay_fraction=0.5, distill_weight=1.0, replay_source=source,
                                   generated_windows=16, train=stage_cfg(30))
        return continual_stage(parent, DATA_B, [DATA_B], options, tag="B").child

    corpora, both = stage("corpora"), stage("both")
    assert evaluate_bpb(both, VAL, 32, 8) < evaluate_bpb(corpora, VAL, 32, 8)
    with pytest.raises(ValueError, match="replay_source"):
        ContinualOptions("replay", replay_fraction=0.5, replay_source="all")
