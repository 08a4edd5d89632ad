"""Retrofit of a pretrained model: PEER layers added to a Llama-format model, then the continual stream.

No download: a BPE tokenizer is trained here with ``tokenizers`` on the packaged corpora, a small
Llama-format model (rotate-half RoPE, RMSNorm, SwiGLU, grouped-query attention, no expert layer) is
pre-trained on the first corpus, written in Hugging Face format (``export_hf``) and loaded back with
``load_hf`` — the path a user's model directory takes. Then, on the corpora after the first, one
stage per corpus (benchmarks/continual.py's stream):

* ``naive fine-tuning``: the pretrained model itself, every parameter training (the baseline);
* ``retrofit parallel ...``: a PEER layer beside the feed-forward of the middle block (function-
  preserving), the base frozen; ``naive`` trains only the pool and its routing, ``grow ...`` grows a
  segment per stage (``grow_freeze``: old experts frozen too; ``replay50 distill1``: the service's
  default protection, which with a frozen base acts on the pool alone);
* ``fine-tuning replay50 distill1``: the same protection as the service default on the base alone (what
  the protection does without a pool);
* ``retrofit parallel, base trains, ...``: the service default with the base training too;
* ``retrofit replace naive``: the PEER layer in place of that block's feed-forward (not
  function-preserving: the table shows what insertion costs).

Every arm first trains on the first corpus for one stage (a retrofit's pool learns the base's own text;
the base arms take the same steps of plain training), so every arm sees the same data, steps and tokens
and the stream starts from comparable models. Reported: bits per byte per corpus after every stage
(R), at insertion, average forgetting, plasticity against naive fine-tuning, final mean; bits per
byte are per UTF-8 byte, so they compare with the byte-level model's in benchmarks/continual.py.

    python benchmarks/retrofit.py --size tiny     # a few minutes on 2 cores
    python benchmarks/retrofit.py                 # --size small
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from peer_model.config import ModelConfig, PEERConfig
from peer_model.continual import ContinualOptions, continual_stage, evaluate_all, forgetting_report
from peer_model.corpora import load_corpus, split_train_val
from peer_model.hf import export_hf, load_hf, retrofit
from peer_model.hf.families import llama_config
from peer_model.model import PEERTransformer
from peer_model.tokenizer import load_tokenizer
from peer_model.train import TokenData, TrainConfig, train

from common import add_stream_arguments, add_threads_argument, parse_stream_run, parser_for, stage_config

CORPORA = ["shakespeare", "kjv", "gcide", "python-docs"]
END = "<|endoftext|>"


@dataclass
class Size:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    seq_len: int  # tokens
    batch_size: int
    base_steps: int
    stage_steps: int
    max_bytes: int  # per corpus
    eval_batches: int
    peer: PEERConfig
    new_experts: int


SIZES = {
    "tiny": Size(64, 2, 4, 2, 1024, 64, 8, 300, 100, 300_000, 4, PEERConfig(num_experts=32 * 32, heads=2, top_k=4,
                                                                              d_key=16), 256),
    "small": Size(128, 4, 4, 2, 2048, 128, 16, 1500, 200, 3_000_000, 12,
                  PEERConfig(num_experts=64 * 64, heads=4, top_k=8, d_key=32), 64 * 64 // 3),
}


def train_bpe(texts: list[str], vocab: int, directory: Path):
    """A byte-level BPE tokenizer trained on ``texts``, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": END, "eos_token": END}))
    return load_tokenizer(directory)


def pretrained_base(size: Size, texts: list[str], base_train: str, workdir: Path, cfg: TrainConfig, seed: int):
    """Pre-train a Llama-format model on ``base_train``, export it in HF format, load it back."""
    tokenizer_dir = workdir / "tokenizer"
    tokenizer = train_bpe(texts, size.vocab, tokenizer_dir)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=size.d_model, n_layers=size.n_layers,
                         n_heads=size.n_heads, n_kv_heads=size.n_kv_heads, d_ff=8 * size.d_model // 3,
                         max_seq_len=size.seq_len, norm="rmsnorm", rope_style="half", mlp="swiglu",
                         tie_embeddings=True, peer_layers=[])
    config = replace(config, hf_config=llama_config(config, tokenizer.bos_id, min(tokenizer.eos_ids)))
    torch.manual_seed(seed)
    model = PEERTransformer(config)
    model.tokenizer = tokenizer
    result = train(model, TokenData.from_text(base_train, tokenizer), None, cfg)
    export_hf(model, workdir / "base-hf")
    print(f"pre-trained the Llama-format base: {result.steps_done} steps in {result.elapsed_s:.0f} s, "
          f"{sum(p.numel() for p in model.parameters())} parameters, vocabulary {tokenizer.vocab_size}", flush=True)
    return load_hf(workdir / "base-hf")


def main() -> None:
    parser = parser_for(__doc__)
    add_stream_arguments(parser, SIZES, CORPORA)
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", help="comma-separated subset of the arms (naive fine-tuning always runs)")
    parser.add_argument("--json", default="runs/retrofit.json")
    args, size = parse_stream_run(parser, SIZES)
    names = args.corpora.split(",")
    started = time.perf_counter()
    texts = {n: split_train_val(load_corpus(n, max_bytes=size.max_bytes), 0.05, seed=args.seed) for n in names}
    cfg = stage_config(size, args.seed)
    base_cfg = replace(cfg, steps=size.base_steps, warmup_steps=max(1, size.base_steps // 10),
                       log_every=max(1, size.base_steps // 4))
    with tempfile.TemporaryDirectory() as tmp:
        sample = [texts[n][0][: size.max_bytes // 4] for n in names]
        base = pretrained_base(size, sample, texts[names[0]][0], Path(tmp), base_cfg, args.seed)
    tokenizer = base.tokenizer
    train_sets = [TokenData.from_text(texts[n][0], tokenizer) for n in names]
    val_sets = {n: TokenData.from_text(texts[n][1], tokenizer) for n in names}
    print("bytes per token: " + ", ".join(f"{n} {val_sets[n].bytes_per_token:.2f}" for n in names))

    def measure(model, stage: int) -> list[float | None]:
        bpb = evaluate_all(model, {n: val_sets[n] for n in names[: stage + 1]}, size.seq_len, size.batch_size,
                           size.eval_batches)
        return [bpb.get(n) for n in names]

    grow = dict(new_experts=size.new_experts, freeze_old_sub_keys=True, freeze_query_batchnorm_stats=True)
    protect = dict(replay_fraction=0.5, distill_weight=1.0)
    arms = {  # label: (branch or None for the base itself, what trains outside the pool, the stages' strategy)
        "naive fine-tuning": (None, "all", ContinualOptions("naive", train=cfg)),
        "fine-tuning replay50 distill1": (None, "all", ContinualOptions("replay", train=cfg, **protect)),
        "retrofit parallel naive": ("parallel", "none", ContinualOptions("naive", train=cfg)),
        "retrofit replace naive": ("replace", "none", ContinualOptions("naive", train=cfg)),
        "retrofit parallel grow_freeze": ("parallel", "none", ContinualOptions("grow_freeze", train=cfg, **grow)),
        "retrofit parallel grow replay50 distill1": ("parallel", "none", ContinualOptions(
            "replay", new_experts=size.new_experts, train=cfg, **protect)),
        "retrofit parallel, base trains, grow replay50 distill1": ("parallel", "all", ContinualOptions(
            "replay", new_experts=size.new_experts, train=cfg, **protect)),
    }
    if args.arms:
        arms = {k: v for k, v in arms.items() if k == "naive fine-tuning" or k in args.arms.split(",")}
    results = {}
    for label, (branch, base_trains, options) in arms.items():
        t0 = time.perf_counter()
        model, inserted = base, None
        if branch is not None:
            model = retrofit(base, size.peer, layers="middle", branch=branch, base_trains=base_trains, seed=args.seed)
            inserted = measure(model, 0)[0]
        model = continual_stage(model, train_sets[0], [], ContinualOptions("naive", train=cfg)).child
        R = [measure(model, 0)]
        for stage in range(1, len(names)):
            model = continual_stage(model, train_sets[stage], train_sets[:stage], options, tag=names[stage]).child
            R.append(measure(model, stage))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results[label] = {"R": R, "at_insertion": inserted, "seconds": time.perf_counter() - t0,
                          "trainable_parameters": trainable,
                          "experts": sum(layer.num_experts for layer in model.peer_layers().values())}
        print(f"{label}: {results[label]['seconds']:.0f} s", flush=True)

    reference = results["naive fine-tuning"]["R"]
    naive_forgetting = forgetting_report(reference)["average_forgetting"]
    base_bpb = reference[0][0]
    print(f"\nbase model on {names[0]}: {base_bpb:.3f} bpb")
    print("\n| arm | bpb at insertion | forgetting (bpb) | vs naive | plasticity vs naive | relative | final mean bpb "
          "| trainable params | experts |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for label, res in results.items():
        report = forgetting_report(res["R"], reference)
        summary[label] = report
        forgetting = report["average_forgetting"]
        inserted = "" if res["at_insertion"] is None else f"{res['at_insertion']:.3f}"
        print(f"| {label} | {inserted} | {forgetting:+.3f} | {100 * forgetting / naive_forgetting:.0f}% | "
              f"{report['plasticity']:+.3f} | {100 * report['relative_plasticity']:.0f}% | "
              f"{report['final_average_bpb']:.3f} | {res['trainable_parameters']:,} | {res['experts']} |")
    for label, res in results.items():
        print(f"\n{label}: R[stage][corpus]")
        print("| stage | " + " | ".join(names) + " |")
        for stage, row in enumerate(res["R"]):
            print(f"| {stage} | " + " | ".join("" if v is None else f"{v:.3f}" for v in row) + " |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"size": args.size, "corpora": names, "results": results,
                                           "summary": summary}, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
