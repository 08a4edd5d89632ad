"""RowSum: the CSR matrix behind the expert-table and sub-key gradients, against a brute-force sum."""
import torch

from peer_model.rowsum import RowSum


def brute_force(index: torch.Tensor, weights: torch.Tensor, vectors: torch.Tensor, num_rows: int) -> torch.Tensor:
    out = torch.zeros(num_rows, vectors.shape[1], dtype=torch.float64)
    for t in range(index.shape[0]):
        for s in range(index.shape[1]):
            out[index[t, s]] += weights[t, s].double() * vectors[t].double()
    return out


def test_duplicate_pairs_are_coalesced_into_unique_sorted_columns():
    """Two slots of one token on the same row (two PEER heads picking one expert) must become one CSR
    entry: cuSPARSE's product is undefined on a duplicate (row, column) pair."""
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 12, (9, 6), generator=g)
    index[:, 3] = index[:, 0]  # every token holds a duplicate
    weights, vectors = torch.randn(9, 6, generator=g), torch.randn(9, 5, generator=g)
    row_sum = RowSum(index)
    for r in range(row_sum.rows.numel()):
        cols = row_sum.col[row_sum.crow[r] : row_sum.crow[r + 1]].tolist()
        assert cols == sorted(set(cols)), f"row {int(row_sum.rows[r])}: columns {cols}"
    assert row_sum.col.numel() == len({(int(i), t) for t in range(9) for i in index[t]})
    expected = brute_force(index, weights, vectors, 12)
    assert torch.allclose(row_sum.dense(weights, vectors, 12).double(), expected, atol=1e-5)
    assert torch.equal(row_sum.rows, torch.unique(index))


def test_one_pattern_serves_several_value_sets():
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, 40, (30, 8), generator=g)
    row_sum = RowSum(index)
    for _ in range(2):
        weights, vectors = torch.randn(30, 8, generator=g), torch.randn(30, 7, generator=g)
        assert torch.allclose(row_sum.dense(weights, vectors, 40).double(), brute_force(index, weights, vectors, 40),
                              atol=1e-5)
