"""The fast PEER path against the brute-force reference: same experts, same output, same gradients."""
import copy

import pytest
import torch

from peer_model.config import PEERConfig
from peer_model.peer import PEER

D_MODEL = 48


def pair(num_experts, heads, top_k, d_key=32, **options):
    torch.manual_seed(num_experts + heads + top_k)
    fast = PEER(D_MODEL, PEERConfig(num_experts=num_experts, heads=heads, top_k=top_k, d_key=d_key, **options))
    reference = copy.deepcopy(fast)
    reference.reference = True
    return fast, reference


def dense_grad(param):
    return param.grad.to_dense() if param.grad.is_sparse else param.grad


def assert_same_forward_and_backward(fast, reference, x):
    ids_fast = fast.route(x.reshape(-1, D_MODEL))[1]
    ids_ref = reference.route(x.reshape(-1, D_MODEL))[1]
    assert torch.equal(ids_fast, ids_ref), "fast retrieval selected different experts"
    out_fast, out_ref = fast(x), reference(x)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=0)
    target = torch.randn_like(out_ref)
    ((out_fast - target) ** 2).sum().backward()
    ((out_ref - target) ** 2).sum().backward()
    for (name, p_fast), (_, p_ref) in zip(fast.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(dense_grad(p_fast), p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("num_experts,heads,top_k", [(16 * 16, 1, 4), (32 * 32, 4, 8), (64 * 64, 8, 16), (48 * 48, 2, 48)])
def test_fast_path_equals_brute_force(num_experts, heads, top_k):
    fast, reference = pair(num_experts, heads, top_k)
    assert_same_forward_and_backward(fast, reference, torch.randn(3, 11, D_MODEL))


@pytest.mark.parametrize("options", [dict(query_batchnorm=False), dict(activation="relu")])
def test_fast_path_equals_brute_force_with_options(options):
    fast, reference = pair(32 * 32, 4, 8, **options)
    assert_same_forward_and_backward(fast, reference, torch.randn(2, 9, D_MODEL))


def grown_pair():
    fast, reference = pair(24 * 24, 4, 8)
    for layer in (fast, reference):
        torch.manual_seed(7)
        layer.grow(300, tag="a")
        layer.grow(rows=layer.grid.rows + 5, cols=layer.grid.cols, tag="rows only")
        layer.grow(rows=layer.grid.rows, cols=layer.grid.cols + 3, tag="cols only")
        with torch.no_grad():  # trained new experts: make them produce output
            layer.expert_up[24 * 24:] = torch.randn_like(layer.expert_up[24 * 24:]) * 0.1
    assert fast.num_experts > 24 * 24 + 300
    return fast, reference


def test_fast_path_equals_brute_force_after_growth():
    fast, reference = grown_pair()
    for layer in (fast, reference):
        for index in (1, 2, 3):
            layer.set_segment_status(index, "active")
    x = torch.randn(4, 16, D_MODEL)
    assert_same_forward_and_backward(fast, reference, x)
    ids = fast.route(x.reshape(-1, D_MODEL))[1]
    assert bool((ids >= 24 * 24).any()), "new experts must be reachable by retrieval"


@torch.no_grad()
def cell_by_cell_topk(layer, x):
    """Independent reference: every expert's full key scored, the experts of closed segments at -inf, top-k."""
    cfg, n = layer.config, layer.num_experts
    queries = layer.query_norm(layer.query(x)).reshape(-1, cfg.d_key).float()
    i, j = layer.grid.id_to_cell(torch.arange(n))
    scores = queries @ torch.cat([layer.sub_keys1[i], layer.sub_keys2[j]], dim=1).float().t()
    closed = torch.tensor([s.status != "active" for s in layer.segments])
    scores = scores.masked_fill(closed[layer.grid.segment_of(torch.arange(n))], float("-inf"))
    return scores.topk(cfg.retrieved_k, dim=-1).indices.view(x.shape[0], -1)


@pytest.mark.parametrize("statuses", [("new", "new", "new"), ("active", "masked", "active"),
                                      ("masked", "active", "new"), ("masked", "masked", "active")])
def test_closed_segments_are_out_of_reach_and_search_stays_exact(statuses):
    """A closed segment's experts are never selected, and no other expert is lost: the selection is the
    cell-by-cell top-k over the open segments' experts, including later experts on a masked segment's
    rows and columns (masking a corpus must not take another corpus' experts with it)."""
    fast, reference = grown_pair()
    for layer in (fast, reference):
        for index, status in enumerate(statuses, start=1):
            layer.set_segment_status(index, status)
        with torch.no_grad():  # grown sub-keys as long as the old ones (as trained), so that cells pairing two grown
            layer.sub_keys1[24:] *= 2  # sub-keys compete (at half the length, as grown, they are rarely selected)
            layer.sub_keys2[24:] *= 2
    x = torch.randn(4, 64, D_MODEL)
    assert_same_forward_and_backward(fast, reference, x)
    ids = fast.route(x.reshape(-1, D_MODEL))[1]
    expected = cell_by_cell_topk(fast, x.reshape(-1, D_MODEL))
    assert torch.equal(ids, expected)
    closed = torch.tensor([False] + [s != "active" for s in statuses])
    assert not bool(closed[fast.grid.segment_of(ids)].any()), "a closed segment's expert was selected"
    assert bool((ids >= 24 * 24).any()) == ("active" in statuses)
    rows, cols = fast.grid.id_to_cell(ids)
    row_segment, col_segment = fast.grid.row_segments(ids.device)
    on_closed_sub_keys = closed[row_segment[rows]] | closed[col_segment[cols]]
    shares_sub_keys = "masked" in statuses and "active" in statuses[statuses.index("masked"):]
    assert bool(on_closed_sub_keys.any()) == shares_sub_keys, "later experts on a masked segment's sub-keys"


def test_opening_segments_search_stays_exact():
    fast, reference = grown_pair()
    x = torch.randn(4, 16, D_MODEL)
    for layer in (fast, reference):
        layer.open_new_segments(0.7)
        layer._open_margin = torch.tensor(6.0)  # the same margin for both, whatever the batch
    assert_same_forward_and_backward(fast, reference, x)


def test_growth_keeps_ids_rows_and_sub_keys_bit_identical():
    layer, _ = pair(32 * 32, 4, 8)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    segment = layer.grow(5000, tag="new corpus")
    assert segment.start == 32 * 32 and segment.end == layer.num_experts >= 32 * 32 + 5000
    assert torch.equal(layer.expert_down[: 32 * 32], before["expert_down"])
    assert torch.equal(layer.expert_up[: 32 * 32], before["expert_up"])
    assert torch.equal(layer.sub_keys1[:32], before["sub_keys1"])
    assert torch.equal(layer.sub_keys2[:32], before["sub_keys2"])
    assert torch.equal(layer.query.weight, before["query.weight"])
    assert layer.expert_up[32 * 32:].abs().sum() == 0, "new experts start silent"
    # the old grid cells still map to the old ids
    i, j = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    assert torch.equal(layer.grid.cell_to_id(i, j).flatten(), torch.arange(32 * 32))


def test_frozen_experts_get_no_gradient_rows():
    layer, _ = pair(16 * 16, 4, 8)
    layer.set_trainable(slice(0, 128), False)
    x = torch.randn(2, 30, D_MODEL)
    layer(x).pow(2).sum().backward()
    for table in (layer.expert_down, layer.expert_up):
        rows = table.grad.coalesce().indices()[0]
        assert rows.numel() > 0 and bool((rows >= 128).all())
    used = layer.route(x.reshape(-1, D_MODEL))[1].unique()
    assert bool((used < 128).any()), "the test must exercise frozen experts"


def test_usage_counts_every_selection():
    layer, _ = pair(16 * 16, 4, 8)
    layer.eval()
    layer.track_usage = True
    x = torch.randn(3, 5, D_MODEL)
    layer(x)
    ids = layer.route(x.reshape(-1, D_MODEL))[1]
    assert torch.equal(layer.usage_counts, torch.bincount(ids.flatten(), minlength=layer.num_experts))
    assert int(layer.usage_counts.sum()) == 3 * 5 * 4 * 8
    layer.reset_usage()
    assert int(layer.usage_counts.sum()) == 0


def test_gates_are_a_softmax_per_head():
    layer, _ = pair(16 * 16, 4, 8)
    gates, ids = layer.route(torch.randn(10, D_MODEL))
    assert gates.shape == ids.shape == (10, 4 * 8)
    torch.testing.assert_close(gates.view(10, 4, 8).sum(-1), torch.ones(10, 4))


def test_both_gather_dot_kernels_equal_a_plain_gather():
    from peer_model.experts import _gather_dot_chunked, _gather_dot_sddmm

    table, vectors = torch.randn(300, 24, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64)
    ids = torch.randint(0, 300, (40, 9))
    ids[:, 1] = ids[:, 0]  # repeated experts within a token
    expected = (table[ids] * vectors.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(_gather_dot_sddmm(table, ids, vectors), expected)
    torch.testing.assert_close(_gather_dot_chunked(table, ids, vectors), expected)


def test_retrieval_scores_in_fp32_whatever_the_dtype():
    """bf16 queries and sub-keys (a bf16 checkpoint served without autocast) select the experts an fp32 search of
    the same values selects: bf16 scores would tie and round (measured: 44% of top-16 sets differed on 1024²)."""
    from peer_model.pool import ExpertGrid
    from peer_model.retrieval import brute_force_topk, multihead_retrieve
    torch.manual_seed(0)
    grid, d_key, k = ExpertGrid.square(256), 32, 16
    keys1, keys2 = (torch.randn(256, d_key // 2).bfloat16() for _ in range(2))
    queries = torch.randn(512, 2 * d_key).bfloat16()  # 2 heads
    weights, ids = multihead_retrieve(queries, keys1, keys2, grid, d_key, k)
    q = queries.float().reshape(-1, d_key)
    scores, expected = brute_force_topk(q[:, : d_key // 2], q[:, d_key // 2 :], keys1.float(), keys2.float(), grid, k)
    assert torch.equal(ids.view(-1, k), expected)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.view(-1, k), torch.softmax(scores, dim=-1))
