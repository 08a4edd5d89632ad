"""Lifelong learning that does not forget: every continual strategy on the same stream of corpora.

A base model is trained on the first corpus; then each strategy (peer_model/continual/) runs the
same stages (one per further corpus, equal steps) from that same base. Every stage's training text
also carries its own invented facts (peer_model/facts.py, BOS before each sentence; at --size small 24
facts, each sentence 1,200 times, so naive fine-tuning recalls nearly all of them). After
every stage: bits per byte on the validation split of every corpus seen so far (R[stage][corpus]),
greedy fact recall on every stage's facts so far (F[stage][facts of stage]) and the bits per byte of
their answers, with those of facts never trained on as the control (A[stage][...]).

Reported per strategy: the R matrix, average forgetting (per old corpus: final bpb − best earlier
bpb) and its ratio to naive's, plasticity (bpb on each corpus right after its own stage − naive's,
> 0 = learns worse than naive; also relative: 0.05 = 5% worse), final fact recall per stage, and
retention of facts: final recall ÷ recall right after their stage, and the same for the answer bits
saved against unseen facts; and the share of the first corpus' expert selections that the final model
routes to experts grown after the base (old inputs drifting to new experts). Strategies named "dense
..." run on the same model with a dense GELU MLP in place of the PEER layer, pre-trained the same way,
and are compared with that dense model's own naive fine-tuning ("dense naive") when it runs.
For growing strategies, forgetting on request: the first stage corpus' segment masked at the end,
without and with a short repair (continual.forget_segments). --peer-layers all puts PEER in every
block; --base-dir keeps the pre-trained bases for later runs.

    python benchmarks/continual.py --size tiny            # < 3 minutes on 2 cores
    python benchmarks/continual.py                        # --size small, DEFAULT_STRATEGIES: 54 minutes with 1 thread
                                                          # beside another run, about 30 on 2 idle cores
    python benchmarks/continual.py --strategies naive,grow_freeze_protect --json runs/c.json
    python benchmarks/continual.py --stage-steps 600 --strategies naive,replay50   # 3x longer stages
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean

import torch

from peer_model.checkpoint import load_checkpoint, save_checkpoint
from peer_model.config import ModelConfig, PEERConfig
from peer_model.continual import (
    ContinualOptions, continual_stage, evaluate_all, forget_segments, forgetting_report, selection_share,
)
from peer_model.corpora import load_corpus, split_train_val
from peer_model.facts import answer_bits, fact_recall, facts_tokens, make_facts
from peer_model.model import PEERTransformer
from peer_model.train import TokenData, TrainConfig, train

from common import (add_stream_arguments, add_threads_argument, parse_stream_run, parser_for, save_figure,
                    stage_config)


@dataclass
class Size:
    model: ModelConfig
    base_steps: int
    stage_steps: int
    batch_size: int
    seq_len: int
    max_bytes: int  # per corpus
    facts: int  # per stage
    fact_repeats: int
    eval_batches: int
    new_experts: int  # per stage and PEER layer
    sparse_top: int


def _model(d, layers, heads, side, peer_heads, k, d_key, seq):
    return ModelConfig(d_model=d, n_layers=layers, n_heads=heads, d_ff=4 * d, max_seq_len=seq,
                       peer_layers=[layers // 2],
                       peer=PEERConfig(num_experts=side * side, heads=peer_heads, top_k=k, d_key=d_key))


def with_peer_layers(config: ModelConfig, where: str) -> ModelConfig:
    """``middle``: PEER in the middle block only (the paper's choice); ``all``: PEER in every block,
    as UltraMemV2 puts memory in every block."""
    return replace(config, peer_layers=list(range(config.n_layers)) if where == "all" else [config.n_layers // 2])


SIZES = {
    "tiny": Size(_model(64, 2, 4, 16, 2, 4, 16, 64), base_steps=300, stage_steps=150, batch_size=8, seq_len=64,
                 max_bytes=300_000, facts=30, fact_repeats=40, eval_batches=4, new_experts=128, sparse_top=32),
    "small": Size(_model(128, 4, 4, 64, 4, 8, 32, 128), base_steps=1500, stage_steps=200, batch_size=16,
                  seq_len=128, max_bytes=3_000_000, facts=24, fact_repeats=1200, eval_batches=12,
                  new_experts=64 * 64 // 3, sparse_top=256),
}

CORPORA = ["shakespeare", "kjv", "gcide", "python-docs"]
DENSE_REFERENCE = "dense naive"  # the same model with a dense GELU MLP instead of PEER, fine-tuned naively
DENSE_PREFIX = "dense "  # strategies whose name starts so run on the dense model


def strategies(size: Size, cfg: TrainConfig) -> dict[str, ContinualOptions]:
    keep = dict(freeze_old_sub_keys=True, freeze_query_batchnorm_stats=True)
    grow = dict(new_experts=size.new_experts)

    def protect_dense(replay: float, distill: float, lr_scale: float = 1.0) -> ContinualOptions:
        """grow + freeze + protect with the dense layers training (the service default's family)."""
        train = replace(cfg, lr=cfg.lr * lr_scale) if lr_scale != 1.0 else cfg
        return ContinualOptions("grow_freeze_protect", replay_fraction=replay, distill_weight=distill,
                                train_dense=True, train=train, **grow, **keep)

    def replay(fraction: float, distill: float = 0.0, grows: bool = False, **extra) -> ContinualOptions:
        """Everything trains, old experts included (+ KL to the parent on old text, + a grown segment)."""
        return ContinualOptions("replay", replay_fraction=fraction, distill_weight=distill, train=cfg,
                                **(grow if grows else {}), **extra)

    def chill(old_lr: float, grows: bool = True, **extra) -> ContinualOptions:
        """Add and chill: the service default's protection, everything older than the stage at
        ``old_lr`` × its learning rate, the new segment at the full rate."""
        return ContinualOptions("replay", replay_fraction=0.5, distill_weight=1.0, old_lr_scale=old_lr, train=cfg,
                                **(grow if grows else {}), **extra)

    return {
        "naive": ContinualOptions("naive", train=cfg),
        DENSE_REFERENCE: ContinualOptions("naive", train=cfg),  # on a model whose middle block is a dense MLP
        # the service default's protection on the dense model: does PEER's growth earn its place?
        "dense replay50 distill1": replay(0.5, 1.0),
        "chill0.1": chill(0.1),
        "chill0.1 no growth": chill(0.1, grows=False),
        "chill0.3": chill(0.3),
        "chill0.3 no growth": chill(0.3, grows=False),
        # old experts frozen; the new segment and routing at the full rate, the dense layers at 0.1x
        "freeze+chill0.1": ContinualOptions("grow_freeze_protect", replay_fraction=0.5, distill_weight=1.0,
                                            train_dense=True, old_lr_scale=0.1, train=cfg, **grow, **keep),
        # the same with random new sub-keys instead of ones drawn from the new corpus' queries
        "replay50 distill1 grow random keys": replay(0.5, 1.0, grows=True, key_init="random"),
        "freeze+chill0.1 random keys": ContinualOptions(
            "grow_freeze_protect", replay_fraction=0.5, distill_weight=1.0, train_dense=True, old_lr_scale=0.1,
            key_init="random", train=cfg, **grow, **keep),
        # generative replay: the old corpora are gone, the parent's own samples are replayed and distilled
        "generative replay50 distill1 grow": replay(0.5, 1.0, grows=True, replay_source="parent"),
        # only the new segment trains (experts and new sub-keys): what masking it takes back is all it learnt
        "segment only": ContinualOptions("grow_freeze", freeze_query=True, train=cfg, **grow, **keep),
        # the service default + MoE-LPR's router review (10% of the stage's steps, routing only)
        "replay50 distill1 grow review": replay(0.5, 1.0, grows=True, review_steps=max(1, cfg.steps // 10)),
        "replay": replay(0.25),
        "replay50": replay(0.5),
        # replay + distillation with the old experts training too (no freezing), without and with growth
        "replay50 distill1": replay(0.5, 1.0),
        "replay50 distill0.3": replay(0.5, 0.3),
        "replay50 distill1 grow": replay(0.5, 1.0, grows=True),  # the service default
        "grow_freeze(routing free)": ContinualOptions("grow_freeze", train=cfg, **grow),
        "grow_freeze": ContinualOptions("grow_freeze", train=cfg, **grow, **keep),
        "grow_freeze+dense": ContinualOptions("grow_freeze", train=cfg, train_dense=True, **grow, **keep),
        "grow_freeze_protect": ContinualOptions("grow_freeze_protect", replay_fraction=0.25, distill_weight=1.0,
                                                train=cfg, **grow, **keep),
        "grow_freeze_protect+dense": protect_dense(0.25, 1.0),
        # Sparse Memory Finetuning: experts ranked per training batch (the paper's way), or once per stage
        "sparse_finetune": ContinualOptions("sparse_finetune", sparse_top_experts=size.sparse_top, train=cfg,
                                            freeze_query_batchnorm_stats=True),
        "sparse_finetune(stage)": ContinualOptions("sparse_finetune", sparse_top_experts=size.sparse_top, train=cfg,
                                                   sparse_selection="stage", freeze_query_batchnorm_stats=True),
        # more protection, or a gentler dense learning rate ("slow": × 0.3)
        "protect+dense replay50": protect_dense(0.5, 1.0),
        "protect+dense slow": protect_dense(0.25, 1.0, lr_scale=0.3),
        "protect+dense replay50 slow": protect_dense(0.5, 1.0, lr_scale=0.3),
        "protect+dense distill3": protect_dense(0.25, 3.0),
        # lighter protection: distillation is what costs most plasticity (BENCHMARKS.md section 3)
        "protect+dense replay50 distill0": protect_dense(0.5, 0.0),
        "protect+dense replay25 distill0.3": protect_dense(0.25, 0.3),
        "protect+dense replay25 distill0.1": protect_dense(0.25, 0.1),
        "protect+dense replay25 distill0.2": protect_dense(0.25, 0.2),
        "protect+dense replay50 distill0.3": protect_dense(0.5, 0.3),
    }


# run when --strategies is not given (the rest by name): BENCHMARKS.md section 3c's first command;
# "replay50 distill1 grow" is the service's default training (service/settings.py)
DEFAULT_STRATEGIES = ["naive", "replay50 distill1 grow", "replay50 distill1", "chill0.1", "chill0.1 no growth",
                      "freeze+chill0.1", "dense replay50 distill1", "replay50 distill1 grow random keys",
                      "segment only"]


def retention(matrix: list[list[float | None]], known, floor: float = 0.01) -> float | None:
    """Mean over the facts of every stage before the last of: what the final model knows of them ÷ what
    the model knew right after their own stage; ``known(row, s)`` reads it from a stage's row (recall,
    or the answer bits saved against unseen facts). Stages whose facts were never known (≤ ``floor``)
    are left out; None if no stage's were."""
    last = len(matrix) - 1
    ratios = [known(matrix[last], s) / known(matrix[s], s) for s in range(last) if known(matrix[s], s) > floor]
    return fmean(ratios) if ratios else None


def table(names: list[str], rows: list[list[float | None]], row_label: str) -> str:
    lines = [f"| {row_label} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s, row in enumerate(rows):
        cells = ["" if v is None else f"{v:.3f}" for v in row]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = parser_for(__doc__)
    add_stream_arguments(parser, SIZES, CORPORA)
    parser.add_argument("--strategies", help="comma-separated subset of the strategy names")
    add_threads_argument(parser)
    parser.add_argument("--stage-steps", type=int, help="training steps per continual stage (default: the size's)")
    parser.add_argument("--peer-layers", choices=["middle", "all"], default="middle",
                        help="blocks with a PEER layer in the PEER models (the dense reference has none)")
    parser.add_argument("--base-dir", help="keep the pre-trained base models here and reuse them in later runs")
    parser.add_argument("--facts", type=int, help="invented facts per stage (default: the size's)")
    parser.add_argument("--fact-repeats", type=int, help="sightings of each fact sentence in its stage's text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="runs/continual.json")
    parser.add_argument("--plot", default="runs/continual.png")
    args, size = parse_stream_run(parser, SIZES)
    if args.stage_steps is not None:
        if args.stage_steps < 1:
            parser.error("--stage-steps must be >= 1")
        size = replace(size, stage_steps=args.stage_steps)
    size = replace(size, model=with_peer_layers(size.model, args.peer_layers),
                   facts=args.facts or size.facts, fact_repeats=args.fact_repeats or size.fact_repeats)
    names = args.corpora.split(",")
    started = time.perf_counter()

    train_sets, val_sets, facts = [], {}, []
    for stage, name in enumerate(names):
        text_train, text_val = split_train_val(load_corpus(name, max_bytes=size.max_bytes), 0.05, seed=args.seed)
        stage_facts = make_facts(stage, size.facts, seed=args.seed)
        tokens = torch.cat([TokenData.from_text(text_train).tokens.to(torch.int16),
                            facts_tokens(stage_facts, size.fact_repeats, seed=args.seed + stage)])
        train_sets.append(TokenData(tokens))
        val_sets[name] = TokenData.from_text(text_val)
        facts.append(stage_facts)
    control = make_facts(len(names), size.facts, seed=args.seed)  # never trained on: the bits of an unknown fact
    cfg = stage_config(size, args.seed)

    def measure(model, stage):
        """bpb per corpus, fact recall per stage's facts, and answer bits per stage's facts + control's."""
        seen = {n: val_sets[n] for n in names[: stage + 1]}
        bpb = evaluate_all(model, seen, size.seq_len, size.batch_size, size.eval_batches)
        pad = [None] * (len(names) - stage - 1)
        recall = [fact_recall(model, facts[s]) for s in range(stage + 1)]
        bits = [fmean(answer_bits(model, group)) for group in [*facts[: stage + 1], control]]
        return [bpb.get(n) for n in names], recall + pad, bits[:-1] + pad + bits[-1:]

    base_cfg = TrainConfig(**{**cfg.__dict__, "steps": size.base_steps, "warmup_steps": max(1, size.base_steps // 10),
                              "log_every": max(1, size.base_steps // 4)})
    bases = {}

    def pretrained(config: ModelConfig):
        """The base model of this architecture, pre-trained on the first corpus (once per run; with
        --base-dir, once per architecture, size, seed and fact probe: later runs load it)."""
        if config.ffw not in bases:  # one PEER architecture per run (--peer-layers) and the dense one
            blocks = "-".join(map(str, config.peer_layers))
            cached = Path(args.base_dir or "", f"{args.size}-{config.ffw}-{blocks}-seed{args.seed}-facts{size.facts}x"
                                               f"{size.fact_repeats}-{size.base_steps}steps")
            if args.base_dir and (cached / "config.json").is_file():
                model = load_checkpoint(cached)
            else:
                torch.manual_seed(args.seed)
                model = PEERTransformer(config)
                train(model, train_sets[0], None, base_cfg)
                if args.base_dir:
                    save_checkpoint(model, cached)
            first = measure(model, 0)
            print(f"{config.ffw} base on {names[0]}: {base_cfg.steps} steps, bpb {first[0][0]:.3f}, fact recall "
                  f"{first[1][0]:.2f}, answer bits {first[2][0]:.2f} (unseen {first[2][-1]:.2f}) "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            never = evaluate_all(model, val_sets, size.seq_len, size.batch_size, size.eval_batches)
            bases[config.ffw] = model, first, never
        return bases[config.ffw]

    def forget_report(model, never_trained: dict[str, float], final: list[float]) -> dict:
        """Forgetting on request of the first stage corpus (names[1]): its segment (index 1 in every
        PEER layer) masked, without and with a repair of stage_steps // 10 steps on the other corpora.
        ``moved_back``: the share of the way from its final bpb back to the base model's (never trained
        on it); ``others_moved``: the largest relative change of any other corpus' bpb."""
        target = names[1]
        others = [n for n in names if n != target]
        report = {}
        for repair in (0, max(1, size.stage_steps // 10)):
            forgotten, _ = forget_segments(model, {i: [1] for i in model.peer_layers()},
                                           [train_sets[names.index(n)] for n in others], repair, cfg)
            bpb = evaluate_all(forgotten, val_sets, size.seq_len, size.batch_size, size.eval_batches)
            done = dict(zip(names, final))
            report[f"repair{repair}"] = {
                "bpb": bpb,
                "moved_back": (bpb[target] - done[target]) / (never_trained[target] - done[target]),
                "others_moved": max(abs(bpb[n] / done[n] - 1) for n in others),
            }
        return report

    chosen = strategies(size, cfg)
    if args.strategies:
        unknown = set(args.strategies.split(",")) - set(chosen)
        if unknown:
            parser.error(f"unknown strategies {sorted(unknown)}; known: {', '.join(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in args.strategies.split(",")}
    else:
        chosen = {k: chosen[k] for k in DEFAULT_STRATEGIES}

    results = {}
    for label, options in chosen.items():
        config = replace(size.model, ffw="dense") if label.startswith(DENSE_PREFIX) else size.model
        model, first, never_trained = pretrained(config)
        t0 = time.perf_counter()
        R, F, A, moved = [first[0]], [first[1]], [first[2]], [0.0]
        base_experts = {i: layer.num_experts for i, layer in model.peer_layers().items()}
        for stage in range(1, len(names)):
            model = continual_stage(model, train_sets[stage], train_sets[:stage], options, tag=names[stage]).child
            row, recall, bits = measure(model, stage)
            R.append(row)
            F.append(recall)
            A.append(bits)
            moved.append(selection_share(model, val_sets[names[0]], base_experts, size.eval_batches,
                                         size.batch_size, size.seq_len, seed=args.seed))
        results[label] = {"R": R, "fact_recall": F, "answer_bits": A, "old_text_on_new_experts": moved,
                          "seconds": time.perf_counter() - t0,
                          "experts": sum(layer.num_experts for layer in model.peer_layers().values())}
        if options.new_experts and len(names) > 2:
            results[label]["forget"] = forget_report(model, never_trained, R[-1])
        print(f"{label}: {results[label]['seconds']:.0f} s", flush=True)

    def reference_of(label: str) -> list | None:
        """Naive fine-tuning of the same model: the dense model's own for "dense ..." arms, when it ran."""
        own = DENSE_REFERENCE if label.startswith(DENSE_PREFIX) and DENSE_REFERENCE in results else "naive"
        return results.get(own, {}).get("R")

    summary = {}
    for label, res in results.items():
        reference = reference_of(label)
        naive_forgetting = forgetting_report(reference)["average_forgetting"] if reference else None
        report = forgetting_report(res["R"], reference)
        forgetting = report["average_forgetting"]
        summary[label] = {
            "average_forgetting": forgetting,
            "forgetting_vs_naive": forgetting / naive_forgetting if naive_forgetting and forgetting is not None else None,
            "plasticity_vs_naive": report.get("plasticity"),
            "relative_plasticity": report.get("relative_plasticity"),
            "final_average_bpb": report["final_average_bpb"],
            "final_fact_recall": res["fact_recall"][-1],
            "fact_recall_when_learned": [res["fact_recall"][s][s] for s in range(len(names))],
            "fact_recall_retention": retention(res["fact_recall"], lambda row, s: row[s]),
            "fact_bits_retention": retention(res["answer_bits"], lambda row, s: row[-1] - row[s]),
            "old_text_on_new_experts": res["old_text_on_new_experts"][-1],
        }
        print(f"\n### {label}  ({res['seconds']:.0f} s, {res['experts']} experts per PEER layer at the end)")
        print("bits per byte, R[stage][corpus]:")
        print(table(names, res["R"], "stage"))
        print("fact recall, F[stage][facts of stage]:")
        print(table([f"facts{s}" for s in range(len(names))], res["fact_recall"], "stage"))
        print("answer bits per byte, A[stage][facts of stage, then unseen facts]:")
        print(table([f"facts{s}" for s in range(len(names))] + ["unseen"], res["answer_bits"], "stage"))

    print("\n| strategy | avg forgetting (bpb) | vs naive | plasticity vs naive (bpb) | relative | final mean bpb "
          "| final recall per stage | recall kept | fact bits kept | first corpus on new experts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    signed = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
    percent = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    for label, s in summary.items():
        recall = " ".join(f"{r:.2f}" for r in s["final_fact_recall"])
        print(f"| {label} | {signed(s['average_forgetting'])} | {percent(s['forgetting_vs_naive'])} | "
              f"{signed(s['plasticity_vs_naive'])} | {percent(s['relative_plasticity'])} | "
              f"{s['final_average_bpb']:.3f} | {recall} | {percent(s['fact_recall_retention'])} | "
              f"{percent(s['fact_bits_retention'])} | {percent(s['old_text_on_new_experts'])} |")
    forgetting_rows = [(label, res["forget"]) for label, res in results.items() if "forget" in res]
    if forgetting_rows:
        print(f"\nforgetting {names[1]} on request (its segment masked; repair = stage_steps // 10 steps on the "
              "other corpora with distillation):")
        print("| strategy | moved back | others moved (max) | moved back, repaired | others moved, repaired |")
        print("|---|---|---|---|---|")
        for label, report in forgetting_rows:
            plain, repaired = report["repair0"], report[next(k for k in report if k != "repair0")]
            print(f"| {label} | {percent(plain['moved_back'])} | {100 * plain['others_moved']:.1f}% | "
                  f"{percent(repaired['moved_back'])} | {100 * repaired['others_moved']:.1f}% |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")

    out = {"size": args.size, "corpora": names, "model": size.model.to_dict(), "stage_steps": size.stage_steps,
           "facts": size.facts, "fact_repeats": size.fact_repeats,
           "base_steps": size.base_steps, "results": results, "summary": summary,
           "total_s": time.perf_counter() - started}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for label, res in results.items():
        axes[0].plot(range(len(names)), [row[0] for row in res["R"]], marker="o", label=label)
        axes[2].plot(range(len(names)), [row[-1] - row[0] for row in res["answer_bits"]], marker="o", label=label)
        s = summary[label]
        if s["average_forgetting"] is not None and s["plasticity_vs_naive"] is not None:
            axes[1].scatter(s["plasticity_vs_naive"], s["average_forgetting"])
            axes[1].annotate(label, (s["plasticity_vs_naive"], s["average_forgetting"]), fontsize=7)
    axes[0].set(title=f"bpb on {names[0]} after each stage", xlabel="stage", ylabel="bits per byte")
    axes[1].set(title="forgetting vs plasticity (lower-left is better)", xlabel="plasticity vs naive (bpb)",
                ylabel="average forgetting (bpb)")
    axes[2].set(title="stage-0 facts: answer bits saved against unseen facts", xlabel="stage",
                ylabel="bits per byte (higher: known better)")
    axes[0].legend(fontsize=7)
    save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
