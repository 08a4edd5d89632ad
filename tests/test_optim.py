"""SparseRowAdam against independent references: torch Adam and a plain per-row Adam loop.

SparseRowAdam keeps one second-moment scalar per row (the running mean of the row's squared
gradient), so it equals element-wise ``torch.optim.Adam`` only for rows of width 1.
"""
import math

import pytest
import torch

from peer_model.optim import SparseRowAdam

ROWS, DIM = 12, 5


def sparse_rows(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, (ROWS, values.shape[1]), check_invariants=True)


def reference_row_adam(weights, grads_per_step, lr, betas, eps, weight_decay):
    """Adam written out row by row: each row has its own first moment (a vector), second moment (one
    scalar: the mean squared gradient of the row) and step count, advanced only on the steps whose
    gradient contains the row. ``grads_per_step``: list of {row: summed gradient vector}."""
    beta1, beta2 = betas
    weights = [row.clone().double() for row in weights]
    state = {}
    for grads in grads_per_step:
        for r, g in grads.items():
            g = g.double()
            m, v, t = state.get(r, (torch.zeros(DIM, dtype=torch.float64), 0.0, 0))
            t += 1
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * float((g * g).mean())
            state[r] = (m, v, t)
            m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
            weights[r] = weights[r] * (1 - lr * weight_decay) - lr * m_hat / (math.sqrt(v_hat) + eps)
    return torch.stack(weights).float(), {r: t for r, (_, _, t) in state.items()}


def test_equals_torch_adam_for_width_one_rows_each_with_a_gradient_every_step():
    torch.manual_seed(0)
    init = torch.randn(ROWS, 1)
    ours = torch.nn.Parameter(init.clone())
    theirs = torch.nn.Parameter(init.clone())
    opt_ours = SparseRowAdam([ours], lr=1e-2, betas=(0.9, 0.95))
    opt_theirs = torch.optim.Adam([theirs], lr=1e-2, betas=(0.9, 0.95))
    for _ in range(20):
        grad = torch.randn(ROWS, 1)
        ours.grad = sparse_rows(torch.arange(ROWS), grad)
        theirs.grad = grad.clone()
        opt_ours.step()
        opt_theirs.step()
    torch.testing.assert_close(ours.data, theirs.data, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_random_row_subsets_match_a_per_row_adam_loop(weight_decay):
    torch.manual_seed(1)
    init = torch.randn(ROWS, DIM)
    param = torch.nn.Parameter(init.clone())
    lr, betas, eps = 1e-2, (0.9, 0.99), 1e-8
    opt = SparseRowAdam([param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    never = {3, 7}  # rows no gradient ever touches
    candidates = torch.tensor([r for r in range(ROWS) if r not in never])
    history = []
    for _ in range(30):
        chosen = candidates[torch.randperm(len(candidates))[: int(torch.randint(1, 6, ()))]]
        rows = torch.cat([chosen, chosen[:1]])  # a duplicate row: its two values must be summed
        values = torch.randn(len(rows), DIM)
        param.grad = sparse_rows(rows, values)  # uncoalesced, as autograd may deliver it
        opt.step()
        summed = {}
        for r, v in zip(rows.tolist(), values):
            summed[r] = summed.get(r, 0) + v
        history.append(summed)
    expected, expected_steps = reference_row_adam(init, history, lr, betas, eps, weight_decay)
    torch.testing.assert_close(param.data, expected, rtol=0, atol=1e-5)
    steps = opt.state[param]["step"]
    assert {r: int(steps[r]) for r in range(ROWS) if steps[r] > 0} == expected_steps
    for r in never:
        assert steps[r] == 0
        assert torch.equal(param.data[r], init[r])  # bit-identical


def test_rows_without_gradient_stay_bit_identical_with_weight_decay():
    torch.manual_seed(2)
    init = torch.randn(ROWS, DIM)
    param = torch.nn.Parameter(init.clone())
    opt = SparseRowAdam([param], lr=0.1, weight_decay=0.5)
    for _ in range(5):
        param.grad = sparse_rows(torch.tensor([0, 5]), torch.randn(2, DIM))
        opt.step()
    untouched = [r for r in range(ROWS) if r not in (0, 5)]
    assert torch.equal(param.data[untouched], init[untouched])
    assert not torch.equal(param.data[[0, 5]], init[[0, 5]])
    assert torch.count_nonzero(opt.state[param]["exp_avg"][untouched]) == 0


def test_empty_sparse_gradient_is_a_no_op():
    param = torch.nn.Parameter(torch.randn(ROWS, DIM))
    before = param.data.clone()
    param.grad = sparse_rows(torch.zeros(0, dtype=torch.long), torch.zeros(0, DIM))
    SparseRowAdam([param]).step()
    assert torch.equal(param.data, before)


def test_dense_gradient_raises_type_error():
    param = torch.nn.Parameter(torch.randn(ROWS, DIM))
    param.grad = torch.randn(ROWS, DIM)
    with pytest.raises(TypeError):
        SparseRowAdam([param]).step()


def test_rejects_invalid_hyper_parameters():
    param = torch.nn.Parameter(torch.randn(ROWS, DIM))
    for kwargs in ({"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": -1e-8}):
        with pytest.raises(ValueError):
            SparseRowAdam([param], **kwargs)


def test_first_update_of_a_rare_row_is_fully_bias_corrected():
    """A row first used at step 50 moves by ~lr, as in a fresh Adam (sign of its gradient)."""
    param = torch.nn.Parameter(torch.zeros(ROWS, DIM))
    opt = SparseRowAdam([param], lr=1e-2)
    for _ in range(49):
        param.grad = sparse_rows(torch.tensor([0]), torch.randn(1, DIM))
        opt.step()
    param.grad = sparse_rows(torch.tensor([1]), torch.full((1, DIM), 3.0))
    opt.step()
    assert math.isclose(float(param.data[1, 0]), -1e-2, rel_tol=1e-4)


def test_row_learning_rates_equal_separate_optimizers_at_the_scaled_rates():
    """A group's ``row_lr`` multiplies each row's rate (weight decay included): rows at rate r move as
    an optimizer with lr × r would move them."""
    torch.manual_seed(0)
    weights = torch.randn(ROWS, DIM)
    rates = torch.tensor([1.0, 0.1, 0.0, 0.5] * (ROWS // 4))
    steps = [torch.randperm(ROWS)[:7].sort().values for _ in range(4)]
    grads = [torch.randn(len(rows), DIM) for rows in steps]

    def run(group_options):
        param = torch.nn.Parameter(weights.clone())
        opt = SparseRowAdam([{"params": [param], **group_options}], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
        for rows, values in zip(steps, grads):
            param.grad = sparse_rows(rows, values)
            opt.step()
        return param.detach()

    mixed = run({"row_lr": rates})
    for rate in rates.unique().tolist():
        rows = rates == rate
        torch.testing.assert_close(mixed[rows], run({"lr": 1e-2 * rate})[rows], atol=1e-6, rtol=1e-5)
    assert torch.equal(mixed[rates == 0], weights[rates == 0]), "rate 0 leaves a row bit-identical"


# ---- bf16 parameters, fp32 optimizer state (the GPU setting; the mechanics are device-independent) -----


def test_bf16_table_keeps_fp32_state_and_gets_the_fp32_update_rounded_once():
    g = torch.Generator().manual_seed(3)
    start = torch.randn(ROWS, DIM, generator=g)
    half = torch.nn.Parameter(start.to(torch.bfloat16))
    full = torch.nn.Parameter(half.detach().float())
    rows = torch.tensor([1, 4, 7])
    values = torch.randn(3, DIM, generator=g).to(torch.bfloat16)
    for param, grad_values in ((half, values), (full, values.float())):
        opt = SparseRowAdam([param], lr=1e-2)
        param.grad = sparse_rows(rows, grad_values)
        opt.step()
        state = opt.state[param]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.detach(), full.detach().to(torch.bfloat16))


def test_bf16_dense_parameters_step_through_fp32_masters():
    """AdamW holds fp32 copies of bf16 parameters: its moments are fp32 and the model gets the master
    rounded, so updates far below bf16's resolution still accumulate."""
    from torch import nn

    from peer_model.train import TrainConfig, build_optimizers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    reference = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4))
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    cfg = TrainConfig(lr=1e-4, weight_decay=0.0)
    optimizers, expected = build_optimizers(model, cfg), build_optimizers(reference, cfg)
    assert len(optimizers.masters) == 4  # weight and bias of both modules
    for step in range(20):
        grads = [torch.randn_like(p).to(torch.bfloat16).float() for p in reference.parameters()]  # as bf16 has them
        for opt, module in ((optimizers, model), (expected, reference)):
            opt.zero_grad()
            for param, grad in zip(module.parameters(), grads):
                param.grad = grad.to(param.dtype)
            opt.step()
    for param, master in optimizers.masters:
        assert master.dtype == torch.float32 and torch.equal(param.detach(), master.detach().to(torch.bfloat16))
        assert all(v.dtype == torch.float32 for v in optimizers.dense.state[master].values() if v.dim())
    for (_, master), ref in zip(optimizers.masters, reference.parameters()):
        assert torch.allclose(master, ref, atol=1e-6)  # 20 steps of 1e-4 in bf16 alone would mostly round away


def test_bf16_parameters_need_cuda():
    from peer_model.config import ModelConfig, PEERConfig
    from peer_model.model import PEERTransformer
    from peer_model.train import TokenData, TrainConfig, cast_parameters, train

    model = PEERTransformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                        peer=PEERConfig(num_experts=64, heads=2, top_k=4, d_key=16)))
    with pytest.raises(ValueError, match="needs CUDA"):
        train(model, TokenData.from_text("abc " * 100), None, TrainConfig(steps=1, param_dtype="bfloat16", device="cpu"))
    cast_parameters(model, torch.bfloat16)
    assert model.embed.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16  # tied: one object
    assert model.rope_cos.dtype == torch.float32  # rotations stay exact
    assert model.peer_layers()[1].query_norm.running_var.dtype == torch.bfloat16
