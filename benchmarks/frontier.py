"""The forgetting / plasticity frontier of every strategy in one or more continual-benchmark runs.

Reads the JSON files benchmarks/continual.py writes and plots, per strategy, forgetting relative to naive
fine-tuning (log scale: the protecting strategies sit within a few percent of each other) against the
relative plasticity gap; each run's points carry its label. Lower-left is better; the issue's target
box (forgetting <= 10% of naive's, plasticity gap <= 5%) is drawn.

    python benchmarks/frontier.py runs/c12-middle.json:middle runs/c12-all.json:"every block" --plot docs/frontier.png
"""
from __future__ import annotations

import json
from pathlib import Path

from common import parser_for, save_figure


def points(path: Path) -> list[tuple[str, float, float]]:
    summary = json.loads(path.read_text())["summary"]
    return [(name, s["relative_plasticity"], s["forgetting_vs_naive"]) for name, s in summary.items()
            if name != "naive" and s["forgetting_vs_naive"] is not None and s["relative_plasticity"] is not None]


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("runs", nargs="+", help="PATH.json or PATH.json:label")
    parser.add_argument("--plot", default="runs/frontier.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6.5))
    markers = "osD^v<>"
    for index, spec in enumerate(args.runs):
        path, _, label = spec.partition(":")
        label = label or Path(path).stem
        rows = points(Path(path))
        ax.scatter([100 * p for _, p, _ in rows], [100 * f for _, _, f in rows], marker=markers[index % len(markers)],
                   label=label, s=36)
        for name, plasticity, forgetting in rows:
            ax.annotate(name, (100 * plasticity, 100 * forgetting), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")
            print(f"{label:14s} {name:40s} plasticity {100 * plasticity:+6.1f}%  forgetting {100 * forgetting:6.1f}%")
    ax.fill_between([min(0, ax.get_xlim()[0]), 5], 0.1, 10, color="green", alpha=0.08, label="target")
    ax.set_yscale("log")
    ax.set(xlabel="plasticity gap: bpb on each new corpus after its stage vs naive's (%)",
           ylabel="average forgetting, % of naive fine-tuning's (log)",
           title="continual benchmark: forgetting vs plasticity (lower-left is better)")
    ax.legend(fontsize=8)
    save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
