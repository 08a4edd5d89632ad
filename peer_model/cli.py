"""`peer`: train, evaluate, sample from, grow and inspect PEER language models from the shell.

    peer train --corpus shakespeare --max-bytes 1000000 --steps 2000 --out runs/shakespeare
    peer train --nproc 4 --corpus shakespeare --steps 2000 --out runs/sharded   # expert tables split over 4 processes
    peer eval runs/shakespeare --corpus shakespeare
    peer generate runs/shakespeare "ROMEO:" --max-tokens 200 --temperature 0.8 --top-p 0.9
    peer grow runs/shakespeare --experts 4096 --tag jargon --out runs/grown
    peer info runs/grown
    peer retrofit path/to/hf-model --out runs/retrofit     # PEER beside a pretrained model's middle feed-forward
    peer retrofit path/to/model.gguf --out runs/retrofit   # the same from a GGUF file (llama.cpp's format)
    peer export runs/retrofit --hf exported/                # back to Hugging Face format (+ the expert tensors)
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta, save_checkpoint
from .config import ATTENTION_KINDS, BASE_TRAINS, FFW_KINDS, ModelConfig, PEERConfig
from .corpora import CORPORA, CorpusUnavailable, load_corpus, split_train_val
from .distributed import DataParallel, load_sharded_checkpoint, save_sharded_checkpoint, shard_peer_layers
from .distributed.launch import join_process_group, launched_by_torchrun, run_processes
from .generate import SamplingParams, generate
from .hf import UnsupportedModel, export_hf, is_pretrained, load_hf, retrofit
from .flops import count_flops
from .model import PEERTransformer
from .presets import PRESETS, preset_config
from .runtime import tune_allocator
from .train import TokenData, TrainConfig, evaluate_bpb, train
from .usage import segment_usage


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def load_model(path: str, device: str = "cpu") -> PEERTransformer:
    """One of our checkpoints, or a pretrained model (a Hugging Face directory or a GGUF file, loaded as it
    is, no expert layer added)."""
    if is_pretrained(path):
        return load_hf(path, device=device)
    return load_checkpoint(path, device)


def _read_texts(args: argparse.Namespace) -> str:
    parts = []
    for name in args.corpus or []:
        if name not in CORPORA:
            raise CLIError(f"unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}")
        parts.append(load_corpus(name, args.data_dir, args.max_bytes))
    for path in args.text_file or []:
        try:
            parts.append(Path(path).read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CLIError(f"cannot read {path} as UTF-8 text: {exc}") from None
    if not parts:
        raise CLIError("give at least one --corpus NAME or --text-file PATH")
    text = "\n".join(parts)
    if not text.strip():
        raise CLIError("the training text is empty")
    return text


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", action="append", help=f"packaged corpus ({', '.join(sorted(CORPORA))}); repeatable")
    parser.add_argument("--text-file", action="append", help="UTF-8 text file; repeatable")
    parser.add_argument("--max-bytes", type=int, help="use at most this many bytes of each corpus")
    parser.add_argument("--data-dir", help="corpus cache folder (default: $PEER_DATA_DIR or ./data/corpora)")
    parser.add_argument("--val-fraction", type=float, default=0.05)


def _model_config(args: argparse.Namespace) -> ModelConfig:
    """The --preset shape (default cpu-small) with every shape flag the user gave over it."""
    base = PRESETS[args.preset]
    peer = {name: value for name, value in (("num_experts", args.experts), ("heads", args.peer_heads),
                                            ("top_k", args.top_k), ("d_key", args.d_key)) if value is not None}
    if args.no_query_batchnorm:
        peer["query_batchnorm"] = False
    shape = {name: value for name, value in (("d_model", args.d_model), ("n_layers", args.layers),
                                             ("n_heads", args.heads), ("d_ff", args.d_ff),
                                             ("max_seq_len", args.max_seq_len), ("peer_layers", args.peer_layers))
             if value is not None}
    return preset_config(args.preset, **shape, peer=replace(base.peer, **peer), ffw=args.ffw, attention=args.attention)


def cmd_train(args: argparse.Namespace) -> None:
    if args.nproc > 1 and not launched_by_torchrun():
        status = run_processes(args.nproc, args.argv)
        if status:
            raise CLIError(f"{args.nproc} training processes failed (exit status {status})")
        return
    text = _read_texts(args)
    train_text, val_text = split_train_val(text, args.val_fraction)
    shards, device = join_process_group(args.device) if launched_by_torchrun() else (None, args.device)
    if args.init and shards is not None and not is_pretrained(args.init):
        model = load_sharded_checkpoint(args.init, shards)  # only this process' columns are read
    elif args.init:
        model = load_model(args.init)
    else:
        torch.manual_seed(args.seed)  # the same model on every process
        model = PEERTransformer(_model_config(args))
    parallel = None
    if shards is not None:
        shard_peer_layers(model, shards)
        parallel = DataParallel(model, shards)
    main_process = shards is None or shards.rank == 0
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      expert_lr=args.expert_lr, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                      eval_batches=args.eval_batches, seed=args.seed, device=device)
    if cfg.seq_len > model.config.max_seq_len:
        raise CLIError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    train_data = TokenData.from_text(train_text, model.tokenizer)
    val_data = TokenData.from_text(val_text, model.tokenizer)
    if len(train_data) <= cfg.seq_len or len(val_data) <= cfg.seq_len:
        raise CLIError(f"need more than {cfg.seq_len} tokens in both the training and validation split")
    n_params = sum(p.numel() for p in model.parameters())
    if main_process:
        print(f"model: {n_params / 1e6:.1f}M parameters{' in this process' if shards else ''}, "
              f"{len(train_data):,} training tokens, {len(val_data):,} validation tokens", file=sys.stderr)
    history_file = Path(args.out) / "history.jsonl"
    bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True, disable=not main_process)
    records = []

    def on_log(record: dict) -> None:
        records.append(record)
        bar.update(record["step"] - bar.n)
        shown = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}",
                 "eta": f"{record['eta_s']:.0f}s"}
        if "val_bpb" in record:
            shown["val_bpb"] = f"{record['val_bpb']:.3f}"
        bar.set_postfix(shown)

    batches = train_data if parallel is None else parallel.batches(train_data)
    result = train(model, batches, val_data, cfg, on_log=on_log, parallel=parallel)
    bar.close()
    processes = 1 if shards is None else shards.size
    extra = {"train": {"steps": result.steps_done, "val_bpb": result.final_val_bpb, "processes": processes}}
    if shards is None:
        save_checkpoint(model, args.out, extra=extra)
    else:
        save_sharded_checkpoint(model, args.out, shards, extra=extra)
        dist.destroy_process_group()
    if not main_process:
        return
    history_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"checkpoint": args.out, "steps": result.steps_done, "val_bpb": result.final_val_bpb,
                      "elapsed_s": round(result.elapsed_s, 1)}))


def cmd_eval(args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint, args.device)
    text = _read_texts(args)
    text = text if args.all_text else split_train_val(text, args.val_fraction)[1]
    data = TokenData.from_text(text, model.tokenizer)
    seq_len = min(args.seq_len, model.config.max_seq_len)
    if len(data) <= seq_len:
        raise CLIError(f"need more than {seq_len} tokens to evaluate")
    bpb = evaluate_bpb(model, data, seq_len, args.batch_size, args.max_batches)
    print(json.dumps({"bits_per_byte": bpb, "bytes": len(text.encode("utf-8")), "tokens": len(data)}))


def cmd_generate(args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint, args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop=tuple(args.stop or ()), seed=args.seed)
    prompt_ids = model.tokenizer.encode(args.prompt)
    for step in generate(model, prompt_ids, params):
        sys.stdout.write(step.text)
        sys.stdout.flush()
        if step.finish_reason is not None:
            print(f"\n[finish: {step.finish_reason}]", file=sys.stderr)


def cmd_retrofit(args: argparse.Namespace) -> None:
    base = load_hf(args.hf_dir, max_seq_len=args.max_seq_len)
    peer = PEERConfig(num_experts=args.experts, heads=args.peer_heads, top_k=args.top_k, d_key=args.d_key)
    model = retrofit(base, peer, args.layers, args.branch, args.base_trains, seed=args.seed)
    save_checkpoint(model, args.out, extra={"retrofit_of": str(Path(args.hf_dir).resolve())})
    print(json.dumps({"out": args.out, "family": model.config.hf_config["model_type"],
                      "peer_layers": model.config.peer_layers, "branch": args.branch,
                      "base_trains": args.base_trains, "experts_per_layer": peer.num_experts,
                      "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "parameters": sum(p.numel() for p in model.parameters())}, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint)
    export_hf(model, args.hf)
    print(f"wrote {args.hf}: config.json, model.safetensors and the tokenizer "
          f"({len(model.peer_layers())} expert layers under their family's names + '.peer.')")


def cmd_grow(args: argparse.Namespace) -> None:
    model = load_checkpoint(args.checkpoint)
    segments = model.grow(args.experts, tag=args.tag)
    save_checkpoint(model, args.out or args.checkpoint, extra=read_checkpoint_meta(args.checkpoint).get("extra"))
    for layer, seg in segments.items():
        print(f"layer {layer}: experts {seg.start}..{seg.end - 1} added ({seg.size:,}), grid {seg.rows}x{seg.cols}, "
              f"status {seg.status} (out of retrieval's reach until `peer train --init` opens it)")


def _flops(model) -> dict:
    sides = {i: (layer.grid.rows, layer.grid.cols) for i, layer in model.peer_layers().items()}
    count = count_flops(model.config, grid_sides=sides)
    return {"forward": count.forward_per_token, "train": count.train_per_token,
            "active_parameters": count.active_params, "forward_by_part": count.breakdown,
            "seq_len": model.config.max_seq_len}


def cmd_info(args: argparse.Namespace) -> None:
    model = load_checkpoint(args.checkpoint)
    experts = sum(p.numel() for layer in model.peer_layers().values() for p in (layer.expert_down, layer.expert_up))
    total = sum(p.numel() for p in model.parameters())
    info = {
        "config": model.config.to_dict(),
        "parameters": total,
        "expert_parameters": experts,
        "dense_parameters": total - experts,
        "peer_layers": {
            str(i): {"experts": layer.num_experts, "grid": [layer.grid.rows, layer.grid.cols],
                     "segments": segment_usage(layer.usage_counts, layer.segments)}
            for i, layer in model.peer_layers().items()
        },
        "flops_per_token": _flops(model),
        "extra": read_checkpoint_meta(args.checkpoint).get("extra"),
    }
    print(json.dumps(info, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a new model (or continue one with --init) on text")
    _data_options(p)
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--init", help="checkpoint to start from instead of a fresh model")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--expert-lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--nproc", type=int, default=1,
                   help="train on N processes (torchrun, this machine): the expert tables split by columns, the "
                        "rest data-parallel, --batch-size the global batch; writes a sharded checkpoint")
    shape = p.add_argument_group(
        "model shape (fresh models only): a --preset, each flag given replacing its value")
    shape.add_argument("--preset", default="cpu-small", choices=list(PRESETS),
                       help="cpu-small: d 192, 4 blocks, 128² experts (see benchmarks/learn.py); gpu-base: d 1024, "
                            "12 blocks, 1024² experts, h 8, k 16; gpu-large (peer_model/presets.py)")
    shape.add_argument("--d-model", type=int)
    shape.add_argument("--layers", type=int)
    shape.add_argument("--heads", type=int, help="attention heads")
    shape.add_argument("--d-ff", type=int)
    shape.add_argument("--max-seq-len", type=int)
    shape.add_argument("--peer-layers", type=int, nargs="+", help="block indices with PEER (default: middle)")
    shape.add_argument("--experts", type=int, help="initial pool size (a square)")
    shape.add_argument("--peer-heads", type=int)
    shape.add_argument("--top-k", type=int)
    shape.add_argument("--d-key", type=int)
    shape.add_argument("--no-query-batchnorm", action="store_true")
    shape.add_argument("--ffw", default="peer", choices=FFW_KINDS,
                       help="feed-forward of the --peer-layers blocks (baselines use their config defaults)")
    shape.add_argument("--attention", default="mha", choices=ATTENTION_KINDS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="bits per byte on the validation split of a text")
    p.add_argument("checkpoint")
    _data_options(p)
    p.add_argument("--all-text", action="store_true", help="evaluate on the whole text, not its validation split")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batches", type=int)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample a completion of a prompt")
    p.add_argument("checkpoint")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string; repeatable")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("grow", help="append experts to every PEER layer (ids of old experts never change)")
    p.add_argument("checkpoint")
    p.add_argument("--experts", type=int, required=True, help="at least this many experts per layer")
    p.add_argument("--tag", default="", help="what the new segment is for, e.g. a corpus name")
    p.add_argument("--out", help="write here instead of over the checkpoint")
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("retrofit", help="insert PEER layers into a pretrained model (Hugging Face directory or GGUF)")
    p.add_argument("hf_dir", help="a local model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--layers", default="middle", help="middle, all, spread:K, or comma-separated block indices")
    p.add_argument("--branch", default="parallel", choices=["parallel", "replace"],
                   help="beside the block's feed-forward (function-preserving) or in its place")
    p.add_argument("--base-trains", default="none", choices=list(BASE_TRAINS),
                   help="what trains outside the expert layers later")
    p.add_argument("--experts", type=int, default=256 * 256, help="initial pool size per layer (a square)")
    p.add_argument("--peer-heads", type=int, default=8)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--d-key", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, help="context to serve (default: the model's, at most 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_retrofit)

    p = sub.add_parser("export", help="write a model from a Hugging Face directory back in that format")
    p.add_argument("checkpoint")
    p.add_argument("--hf", required=True, help="output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="configuration, parameter counts, pools and segments of a checkpoint")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # `train --nproc N` runs them again under torchrun
    tune_allocator()
    try:
        args.func(args)
    except (CLIError, CheckpointError, CorpusUnavailable, UnsupportedModel, ValueError) as exc:
        print(f"peer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
