"""What masking an older segment costs a PEER layer's forward: none masked against one and two masked.

The layer has the service's pool shape on a pretrained base (``Settings().peer_config()``, d = 576 as SmolLM2) and
three growths of PEER_NEW_EXPERTS, every segment active; then segment 1 (and 2) masked, each followed by open
segments, so retrieval searches the extra regions that keep the later experts on the masked sub-keys in reach
(peer_model/peer.py ``_retrieval_regions``). Eval mode, no gradients; the arms alternate within each round and
each reports its median over rounds, as ratios to none masked.

    PYTHONPATH=. .venv/bin/python benchmarks/masked_retrieval.py --threads 2
"""
from __future__ import annotations

import statistics

import torch

from common import add_threads_argument, parser_for, setup_torch, timed
from peer_model.peer import PEER
from service.settings import Settings

D_MODEL = 576
MASKED = {"none masked": (), "segment 1 masked": (1,), "segments 1 and 2 masked": (1, 2)}


def grown_layer(settings: Settings, growths: int = 3) -> PEER:
    torch.manual_seed(0)
    layer = PEER(D_MODEL, settings.peer_config()).eval()
    generator = torch.Generator().manual_seed(0)
    for _ in range(growths):
        layer.grow(settings.new_experts, generator=generator)
    return layer


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 1024], help="rows of one forward")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10, help="timed forwards per arm and round")
    add_threads_argument(parser)
    args = parser.parse_args()
    setup_torch(args.threads)
    layer = grown_layer(Settings())
    print(f"{layer.num_experts:,} experts in {len(layer.segments)} segments, {torch.get_num_threads()} thread(s)")
    print("| tokens | " + " | ".join(MASKED) + " |\n|---|" + "---:|" * len(MASKED))
    for tokens in args.tokens:
        x = torch.randn(tokens, D_MODEL)
        medians: dict[str, list[float]] = {name: [] for name in MASKED}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, masked in MASKED.items():
                    for index in range(1, len(layer.segments)):
                        layer.set_segment_status(index, "masked" if index in masked else "active")
                    medians[name].append(statistics.median(timed(lambda: layer(x), x.device, args.iters)))
        times = {name: statistics.median(values) * 1e3 for name, values in medians.items()}
        base = times["none masked"]
        print(f"| {tokens} | " + " | ".join(f"{ms:.2f} ms ({ms / base:.2f}×)" for ms in times.values()) + " |")


if __name__ == "__main__":
    main()
