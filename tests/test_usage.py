import math
import random

import pytest
import torch

from peer_model.config import PEERConfig
from peer_model.peer import PEER
from peer_model.pool import ExpertGrid
from peer_model.usage import grid_heatmap, hottest_experts, segment_usage, usage_stats


def test_uniform_counts():
    stats = usage_stats(torch.full((256,), 7))
    assert stats.num_experts == 256 and stats.total_selections == 7 * 256 and stats.experts_used == 256
    assert stats.usage_fraction == 1.0
    assert stats.kl_from_uniform == pytest.approx(0.0, abs=1e-12)
    assert stats.entropy == pytest.approx(math.log(256))
    assert stats.normalized_entropy == pytest.approx(1.0)
    assert stats.hottest == [(i, 7) for i in range(10)]  # ties: lowest ids first


def test_one_hot_counts():
    counts = torch.zeros(1024, dtype=torch.long)
    counts[37] = 5
    stats = usage_stats(counts, top=3)
    assert stats.usage_fraction == 1 / 1024 and stats.experts_used == 1
    assert stats.kl_from_uniform == pytest.approx(math.log(1024))
    assert stats.entropy == 0.0 and stats.normalized_entropy == 0.0
    assert stats.hottest == [(37, 5)]  # unused experts are not "hot"


def test_no_selections_and_bad_input():
    stats = usage_stats(torch.zeros(16, dtype=torch.long))
    assert (stats.total_selections, stats.experts_used, stats.usage_fraction) == (0, 0, 0.0)
    assert stats.kl_from_uniform is stats.entropy is stats.normalized_entropy is None
    assert stats.hottest == []
    assert usage_stats(torch.tensor([3])).normalized_entropy == 1.0
    for bad in (torch.tensor([1, -1]), torch.ones(2, 2, dtype=torch.long), torch.ones(3), torch.zeros(0, dtype=torch.long)):
        with pytest.raises(ValueError):
            usage_stats(bad)


def test_random_counts_match_brute_force():
    rng = random.Random(0)
    values = [rng.choice([0, 0, 0, 1, 2, 5, 100, rng.randrange(1000)]) for _ in range(500)]
    stats = usage_stats(torch.tensor(values), top=7)
    total, n = sum(values), len(values)
    p = [v / total for v in values]
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    assert stats.total_selections == total
    assert stats.experts_used == sum(v > 0 for v in values)
    assert stats.usage_fraction == pytest.approx(sum(v > 0 for v in values) / n)
    assert stats.entropy == pytest.approx(entropy, rel=1e-12)
    assert stats.kl_from_uniform == pytest.approx(math.log(n) + sum(x * math.log(x) for x in p if x > 0), rel=1e-9)
    assert stats.normalized_entropy == pytest.approx(entropy / math.log(n), rel=1e-12)
    assert stats.hottest == sorted(((i, v) for i, v in enumerate(values) if v), key=lambda t: (-t[1], t[0]))[:7]
    assert hottest_experts(torch.tensor(values), top=1000) == sorted(
        ((i, v) for i, v in enumerate(values) if v), key=lambda t: (-t[1], t[0])
    )
    assert set(stats.to_dict()) >= {"usage_fraction", "kl_from_uniform", "hottest"}


def grown_grid() -> ExpertGrid:
    grid = ExpertGrid.square(4)  # ids 0..15
    grid.grow(4, 6, tag="corpus-a")  # 8 new experts: ids 16..23
    grid.grow(7, 6, tag="corpus-b")  # 18 new experts: ids 24..41
    return grid


def test_segment_usage_on_grown_grid():
    grid = grown_grid()
    counts = torch.zeros(grid.num_experts, dtype=torch.long)
    counts[[0, 1, 15]] = torch.tensor([3, 1, 2])
    counts[20] = 4
    rows = segment_usage(counts, grid.segments)
    assert [(r["start"], r["end"], r["tag"]) for r in rows] == [(0, 16, "initial"), (16, 24, "corpus-a"), (24, 42, "corpus-b")]
    assert [r["selections"] for r in rows] == [6, 4, 0]
    assert [r["experts_used"] for r in rows] == [3, 1, 0]
    assert [r["usage_fraction"] for r in rows] == [3 / 16, 1 / 8, 0.0]
    assert [r["selection_share"] for r in rows] == [0.6, 0.4, 0.0]
    with pytest.raises(ValueError):
        segment_usage(counts[:30], grid.segments)


def test_segment_usage_of_a_grown_peer_layer():
    layer = PEER(16, PEERConfig(num_experts=16, heads=2, top_k=2, d_key=8)).eval()
    layer.grow(20, tag="new")
    layer.track_usage = True
    with torch.no_grad():
        layer(torch.randn(50, 16))
    rows = segment_usage(layer.usage_counts, layer.grid.segments)
    assert sum(r["selections"] for r in rows) == 50 * 2 * 2
    assert rows[1]["tag"] == "new" and rows[1]["end"] == layer.num_experts


def brute_heatmap(counts: list[int], grid: ExpertGrid, bins: int) -> list[list[int]]:
    ids = torch.arange(grid.num_experts)
    rows, cols = grid.id_to_cell(ids)
    cell_of = {(int(i), int(j)): int(e) for e, i, j in zip(ids, rows, cols)}
    heat = [[0] * bins for _ in range(bins)]
    for i in range(grid.rows):
        for j in range(grid.cols):
            heat[i * bins // grid.rows][j * bins // grid.cols] += counts[cell_of[(i, j)]]
    return heat


@pytest.mark.parametrize("bins", [1, 2, 3, 8])
def test_grid_heatmap_matches_brute_force(bins):
    grid = grown_grid()
    rng = random.Random(bins)
    counts = [rng.randrange(5) for _ in range(grid.num_experts)]
    heat = grid_heatmap(torch.tensor(counts), grid, bins=bins)
    assert heat.shape == (bins, bins) and heat.dtype == torch.long
    assert int(heat.sum()) == sum(counts)
    assert heat.tolist() == brute_heatmap(counts, grid, bins)


def test_grid_heatmap_places_single_experts():
    grid = ExpertGrid.square(64)
    counts = torch.zeros(grid.num_experts, dtype=torch.long)
    counts[0] = 1  # cell (0, 0)
    counts[63] = 2  # cell (0, 63)
    counts[64 * 64 - 1] = 3  # cell (63, 63)
    heat = grid_heatmap(counts, grid, bins=32)
    assert heat[0, 0] == 1 and heat[0, 31] == 2 and heat[31, 31] == 3 and int(heat.sum()) == 6
    with pytest.raises(ValueError):
        grid_heatmap(counts[:-1], grid)


def test_cheap_for_a_million_experts():
    grid = ExpertGrid.square(1024)
    counts = torch.randint(0, 3, (grid.num_experts,))
    stats = usage_stats(counts)
    heat = grid_heatmap(counts, grid)
    assert int(heat.sum()) == stats.total_selections
    assert 0.5 < stats.usage_fraction < 0.8
