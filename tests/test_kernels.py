"""The Triton expert mix against the plain one: same output, same gradients, same sparse rows.

Without CUDA the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), which is
slow: shapes are small and each test runs a few combinations of the grid d ∈ {16, 48, 130},
E ∈ {4, 8}, M ∈ {1, 7, 33}, gelu/relu, fp32/bf16.
"""
import pytest
import torch

from peer_model.config import PEERConfig
from peer_model.experts import expert_mix, expert_mix_reference
from peer_model.peer import PEER
from peer_model.pool import ExpertGrid

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels():
    from peer_model.kernels import expert_mix as module  # after conftest set TRITON_INTERPRET
    from peer_model.kernels import triton_available

    if not triton_available(DEVICE):
        pytest.skip(f"the kernels cannot run on {DEVICE} (on CPU they need TRITON_INTERPRET=1 at import)")
    return module


def inputs(M, E, d, N=40, dtype=torch.float32, seed=0, duplicates=True):
    """Tables scaled like PEER's (pre-activations and outputs O(1)); slot 1 repeats slot 0's expert."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N, (M, E), generator=g)
    if duplicates:
        ids[:, 1] = ids[:, 0]  # two heads picking the same expert
    x = torch.randn(M, d, generator=g)
    gates = torch.rand(M, E, generator=g)
    down = torch.randn(N, d, generator=g) * d**-0.5
    up = torch.randn(N, d, generator=g) * d**-0.5
    tensors = [t.to(DEVICE, dtype).requires_grad_() for t in (x, gates, down, up)]
    x, gates, down, up = tensors
    return x, ids.to(DEVICE), gates, down, up


def run(fn, x, ids, gates, down, up, grad, *args, **kwargs):
    out = fn(x, ids, gates, down, up, *args, **kwargs)
    return (out, *torch.autograd.grad(out, (x, gates, down, up), grad))


def detached_fp32(tensors):
    return [t.detach().float().requires_grad_() for t in tensors]


def assert_sparse_rows(grad, expected_rows):
    assert grad.is_sparse and grad.is_coalesced()
    rows = grad._indices()[0]
    assert torch.equal(rows, torch.unique(rows)), "rows not sorted and distinct"
    assert torch.equal(rows.cpu(), expected_rows.cpu())


def assert_matches_reference(kernels, M, E, d, activation, dtype=torch.float32, blocks=None, tol=None):
    x, ids, gates, down, up = inputs(M, E, d, dtype=dtype)
    grad = torch.randn(M, d, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = run(kernels.expert_mix_triton, x, ids, gates, down, up, grad, activation, blocks=blocks)
    # the reference in fp32 on the same (possibly bf16-rounded) values
    x32, gates32, down32, up32 = detached_fp32((x, gates, down, up))
    want = run(expert_mix_reference, x32, ids, gates32, down32, up32, grad.float(), activation)
    atol, rtol = tol or ((1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2))
    for name, g, w, like in zip(("out", "grad x", "grad gates", "grad down", "grad up"), got, want,
                                (up, x, gates, down, up)):
        assert g.dtype == like.dtype, name
        torch.testing.assert_close(g.to_dense().float() if g.is_sparse else g.float(), w, atol=atol, rtol=rtol,
                                   msg=name)
    used = torch.unique(ids)
    assert_sparse_rows(got[3], used)
    assert_sparse_rows(got[4], used)
    return got


@pytest.mark.parametrize("d,E,M,activation", [
    (16, 4, 1, "gelu"), (16, 8, 33, "relu"), (48, 8, 7, "gelu"), (48, 4, 33, "relu"), (130, 4, 7, "relu"),
    (130, 8, 1, "gelu"),
])
def test_fp32_matches_reference_and_cpu_path(kernels, d, E, M, activation):
    got = assert_matches_reference(kernels, M, E, d, activation)
    x, ids, gates, down, up = inputs(M, E, d)
    grad = torch.randn(M, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cpu_path = run(expert_mix, x, ids, gates, down, up, grad, activation)
    for g, w in zip(got, cpu_path):
        if g.is_sparse:
            assert torch.equal(g._indices(), w.coalesce()._indices())
            g, w = g._values(), w.coalesce()._values()
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d,E,M,activation", [(16, 4, 1, "gelu"), (48, 8, 7, "gelu"), (130, 4, 33, "relu")])
def test_bf16_matches_fp32_reference(kernels, d, E, M, activation):
    assert_matches_reference(kernels, M, E, d, activation, dtype=torch.bfloat16)


@pytest.mark.parametrize("d,activation,dtype", [(48, "gelu", torch.float32), (130, "relu", torch.float32),
                                                (48, "gelu", torch.bfloat16)], ids=["48-gelu-fp32", "130-relu-fp32",
                                                                                   "48-gelu-bf16"])
def test_tiled_d_two_passes(kernels, d, activation, dtype):
    """d over BLOCK_D: the dots over all tiles first, then the sums tile by tile (with a ragged last tile)."""
    blocks = kernels.Blocks(tokens=4, dim=16, pairs=4, row_dim=32)
    assert_matches_reference(kernels, 7, 4, d, activation, dtype=dtype, blocks=blocks)


def test_mixed_dtypes(kernels):
    """bf16 activations with fp32 tables (as under autocast): out in the tables' dtype, each grad in its input's."""
    x, ids, gates, down, up = inputs(7, 4, 48)
    x_bf16 = x.detach().bfloat16().requires_grad_()
    grad = torch.randn(7, 48, device=DEVICE)
    got = run(kernels.expert_mix_triton, x_bf16, ids, gates, down, up, grad)
    want = run(expert_mix_reference, *detached_fp32((x_bf16,)), ids, gates, down, up, grad)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].float(), want[1], atol=1e-2, rtol=1e-2)  # grad x rounded to bf16
    for g, w in zip(got[2:], want[2:]):
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, w, atol=1e-5, rtol=1e-5)


def test_frozen_rows_and_grown_grid(kernels):
    """A grown, non-square pool whose newest experts are used by some tokens only; the first segment frozen."""
    grid = ExpertGrid.square(5)
    grid.grow(rows=7, cols=6)  # 42 experts
    N, M, E, d = grid.num_experts, 9, 4, 24
    x, ids, gates, down, up = inputs(M, E, d, N=25)  # ids in the initial segment...
    ids[::3, 2] = torch.arange(N - 3, N, device=DEVICE)  # ...and the newest experts for every third token
    trainable = torch.ones(N, dtype=torch.bool, device=DEVICE)
    trainable[:25] = False
    trainable[[3, 11]] = True
    down_full = torch.cat([down.detach(), torch.randn(N - 25, d, device=DEVICE) * d**-0.5]).requires_grad_()
    up_full = torch.cat([up.detach(), torch.randn(N - 25, d, device=DEVICE) * d**-0.5]).requires_grad_()
    grad = torch.randn(M, d, device=DEVICE)

    got = run(kernels.expert_mix_triton, x, ids, gates, down_full, up_full, grad, "gelu", trainable)
    want = run(expert_mix_reference, *detached_fp32((x,)), ids, *detached_fp32((gates, down_full, up_full)), grad)
    cpu_path = run(expert_mix, x, ids, gates, down_full, up_full, grad, "gelu", trainable)
    used = torch.unique(ids)
    kept = used[trainable[used]]
    assert kept.numel() < used.numel() and int(kept.max()) == N - 1
    for index in (3, 4):
        assert got[index].shape == (N, d)
        assert_sparse_rows(got[index], kept)
        torch.testing.assert_close(got[index]._values(), want[index][kept], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[index].to_dense(), cpu_path[index].to_dense(), atol=1e-5, rtol=1e-5)
    for index in (0, 1, 2):
        torch.testing.assert_close(got[index], want[index], atol=1e-5, rtol=1e-5)


def test_only_the_gradients_asked_for(kernels):
    """Tables without grad (inference-like), x without grad (backward skips the grad-x sum), no tokens."""
    x, ids, gates, down, up = inputs(5, 4, 16)
    out = kernels.expert_mix_triton(x.detach(), ids, gates, down.detach(), up, "relu")
    grad_gates, grad_up = torch.autograd.grad(out.sum(), (gates, up))
    gates32, up32 = detached_fp32((gates, up))
    want = expert_mix_reference(x.detach(), ids, gates32, down.detach(), up32, "relu")
    want_gates, want_up = torch.autograd.grad(want.sum(), (gates32, up32))
    torch.testing.assert_close(grad_gates, want_gates, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_up.to_dense(), want_up, atol=1e-5, rtol=1e-5)

    empty = kernels.expert_mix_triton(x[:0], ids[:0], gates[:0], down, up)
    assert empty.shape == (0, 16)
    empty.sum().backward()
    assert down.grad._nnz() == 0 and up.grad._nnz() == 0


def test_rejects_bad_arguments(kernels):
    x, ids, gates, down, up = inputs(3, 4, 16)
    with pytest.raises(ValueError, match="activation"):
        kernels.expert_mix_triton(x, ids, gates, down, up, "swish")
    with pytest.raises(ValueError, match="down and up"):
        kernels.expert_mix_triton(x, ids, gates, down[:, :8], up)


def test_triton_available(kernels):
    from peer_model.kernels import triton_available

    assert triton_available(DEVICE)
    assert not triton_available("meta")


def test_forward_bytes(kernels):
    # one token, E = 2 rows of u and of v at d = 4 in bf16, x and out in bf16, ids, bf16 gates, fp32 pre
    expected = 2 * 2 * 4 * 2 + 2 * 4 * 2 + 2 * (8 + 2 + 4)
    assert kernels.forward_bytes(1, 2, 4, table_bytes=2, act_bytes=2, gate_bytes=2) == expected


@pytest.mark.parametrize("option", ["head_slices", "dynamic_k"])
def test_the_mh_and_da_layers_mixes_match_the_reference(kernels, option):
    """What an MH-MoE layer hands the expert mix (sub-tokens d / heads wide, experts as wide) and a DA-MoE
    layer (dropped slots: gate 0 and the head's first id repeated), the kernels mix as the reference does."""
    torch.manual_seed(0)
    layer = PEER(32, PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16, **{option: True}))
    handed = {}

    def capture(x, ids, gates):
        handed.update(x=x, ids=ids, gates=gates)
        return expert_mix_reference(x, ids, gates, layer.expert_down, layer.expert_up, layer.config.activation)

    layer.mix = capture
    tokens = torch.randn(24, 32)
    layer(tokens, importance=torch.rand(24) if option == "dynamic_k" else None)
    if option == "dynamic_k":
        assert bool((handed["gates"] == 0).any()), "some slots must be dropped"
    else:
        assert handed["x"].shape == (48, 16)
    x, gates = (handed[name].detach().to(DEVICE).requires_grad_() for name in ("x", "gates"))
    down, up = (t.detach().to(DEVICE).requires_grad_() for t in (layer.expert_down, layer.expert_up))
    ids = handed["ids"].to(DEVICE)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = run(kernels.expert_mix_triton, x, ids, gates, down, up, grad, layer.config.activation)
    want = run(expert_mix_reference, *detached_fp32((x,)), ids, *detached_fp32((gates, down, up)), grad,
               layer.config.activation)
    for name, g, w in zip(("out", "grad x", "grad gates", "grad down", "grad up"), got, want):
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, w, atol=1e-5, rtol=1e-5, msg=name)
