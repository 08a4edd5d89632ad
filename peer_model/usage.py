"""Expert usage statistics from selection counts (PEER paper, section "expert usage and unevenness").

The paper measures, over an evaluation set, z_i = Σ_x g_i(x) (gate mass of expert i), L1-normalised;
*expert usage* is the fraction of experts with z_i > 0 and *unevenness* is KL(z ‖ uniform) =
log N + Σ_i z_i log z_i. Here the distribution is the one of selection counts (one count each time a
head picks the expert for a token: what ``PEER.usage_counts`` holds), so experts_used / usage_fraction
are the paper's; KL and entropy weight every selection alike instead of by its gate.

Everything is a handful of torch reductions over the N counts: cheap for N = 1024².
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .pool import ExpertGrid, Segment


@dataclass(frozen=True)
class UsageStats:
    """Statistics of one layer's counts. With no selections at all, the distribution-based fields
    (kl_from_uniform, entropy, normalized_entropy) are None."""

    num_experts: int
    total_selections: int
    experts_used: int  # experts selected at least once
    usage_fraction: float  # experts_used / num_experts
    kl_from_uniform: float | None  # log N + Σ p log p, nats; 0 = perfectly even, log N = one expert
    entropy: float | None  # -Σ p log p, nats
    normalized_entropy: float | None  # entropy / log N, in [0, 1]
    hottest: list[tuple[int, int]] = field(default_factory=list)  # (expert_id, count), most used first

    def to_dict(self) -> dict:
        return asdict(self)


def _check_counts(counts: torch.Tensor) -> torch.Tensor:
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D (one per expert id), got shape {tuple(counts.shape)}")
    if counts.is_floating_point() or counts.is_complex():
        raise ValueError(f"counts must be integers, got {counts.dtype}")
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    return counts.long()


def hottest_experts(counts: torch.Tensor, top: int = 10) -> list[tuple[int, int]]:
    """The ``top`` most selected experts with a count > 0, as (id, count); ties go to the lower id."""
    counts = _check_counts(counts)
    k = min(top, counts.numel())
    if k <= 0:
        return []
    threshold = max(int(counts.topk(k).values[-1]), 1)
    ids = torch.nonzero(counts >= threshold).squeeze(1)  # ascending ids; usually about k of them
    order = torch.sort(counts[ids], descending=True, stable=True).indices[:k]
    return [(int(i), int(c)) for i, c in zip(ids[order].tolist(), counts[ids[order]].tolist())]


def usage_stats(counts: torch.Tensor, top: int = 10) -> UsageStats:
    """counts: (N,) selections per expert id (e.g. ``PEER.usage_counts``)."""
    counts = _check_counts(counts)
    n = counts.numel()
    if n == 0:
        raise ValueError("counts must hold at least one expert")
    total = int(counts.sum())
    used = int((counts > 0).sum())
    kl = entropy = normalized = None
    if total > 0:
        p = counts.double() / total
        entropy = float(-torch.special.xlogy(p, p).sum())  # xlogy(0, 0) = 0
        log_n = math.log(n)
        kl = max(0.0, log_n - entropy)
        normalized = entropy / log_n if n > 1 else 1.0
    return UsageStats(
        num_experts=n,
        total_selections=total,
        experts_used=used,
        usage_fraction=used / n,
        kl_from_uniform=kl,
        entropy=entropy,
        normalized_entropy=normalized,
        hottest=hottest_experts(counts, top),
    )


def segment_usage(counts: torch.Tensor, segments: list[Segment]) -> list[dict]:
    """Per growth segment (``grid.segments``): its ids, tag, selections and how many experts it uses.

    ``selection_share`` is the segment's part of all selections (0 when there are none).
    """
    counts = _check_counts(counts)
    last = max((s.end for s in segments), default=0)
    if last > counts.numel():
        raise ValueError(f"segments reach expert id {last - 1} but counts hold only {counts.numel()} experts")
    total = int(counts.sum())
    rows = []
    for seg in segments:
        part = counts[seg.start : seg.end]
        selections, used = int(part.sum()), int((part > 0).sum())
        rows.append({
            "start": seg.start,
            "end": seg.end,
            "tag": seg.tag,
            "selections": selections,
            "experts_used": used,
            "usage_fraction": used / seg.size,
            "selection_share": selections / total if total else 0.0,
        })
    return rows


def grid_heatmap(counts: torch.Tensor, grid: ExpertGrid, bins: int = 32) -> torch.Tensor:
    """Selections over the rows × cols product-key grid, summed into a (bins, bins) int64 map.

    Cell (i, j) falls in bin (i · bins // rows, j · bins // cols); when the grid has fewer rows (cols)
    than bins, some bins stay empty. Row index = first sub-key half, column = second.
    """
    counts = _check_counts(counts)
    if counts.numel() != grid.num_experts:
        raise ValueError(f"counts hold {counts.numel()} experts but the grid has {grid.num_experts}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    i, j = grid.id_to_cell(torch.arange(grid.num_experts, device=counts.device))
    flat_bin = torch.div(i * bins, grid.rows, rounding_mode="floor") * bins + torch.div(
        j * bins, grid.cols, rounding_mode="floor"
    )
    heat = torch.zeros(bins * bins, dtype=torch.long, device=counts.device)
    return heat.index_add_(0, flat_bin, counts).view(bins, bins)
