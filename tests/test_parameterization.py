"""The standard / mssp parameterization switch: standard leaves init and optimizer groups as they were,
mssp's multipliers come out as specified at a few widths."""
import pytest
import torch

from peer_model.config import ModelConfig, MoEConfig, PEERConfig
from peer_model.model import PEERTransformer
from peer_model.parameterization import hidden_matrices, lr_multipliers
from peer_model.train import TrainConfig, build_optimizers

CFG = TrainConfig(lr=1e-3, expert_lr=4e-3)


def model(d: int = 64, parameterization: str = "standard", **kwargs) -> PEERTransformer:
    torch.manual_seed(0)
    return PEERTransformer(ModelConfig(d_model=d, n_layers=2, n_heads=2, d_ff=4 * d, max_seq_len=16,
                                       peer=PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16),
                                       parameterization=parameterization, mssp_base_width=128, **kwargs))


def groups(optimizers) -> list[tuple[float, float, list[int]]]:
    """(lr, weight decay, parameter shapes) of every group of both optimizers."""
    out = []
    for opt in (optimizers.dense, optimizers.experts):
        for g in opt.param_groups:
            out.append((g["lr"], g["weight_decay"], [tuple(p.shape) for p in g["params"]]))
    return out


def test_standard_is_the_default_and_changes_nothing():
    default, standard = model(), model(parameterization="standard")
    assert default.config.parameterization == "standard"
    assert lr_multipliers(standard, standard.config) == {}
    for (name, a), b in zip(default.state_dict().items(), standard.state_dict().values()):
        assert torch.equal(a, b), name
    # today's groups: decayed matrices, then the rest, at lr; the expert tables at expert_lr
    got = groups(build_optimizers(standard, CFG))
    assert [(lr, wd) for lr, wd, _ in got] == [(1e-3, 0.1), (1e-3, 0.0), (4e-3, 0.0)]
    assert got[2][2] == [(256, 64), (256, 64)]
    tokens = torch.randint(0, 259, (1, 8))  # the logits are not rescaled
    assert torch.equal(standard.eval()(tokens), standard.lm_head(standard.norm(_blocks(standard, standard.embed(tokens)))))


def _blocks(m: PEERTransformer, x: torch.Tensor) -> torch.Tensor:
    cos, sin = m.rope_cos[: x.shape[1]], m.rope_sin[: x.shape[1]]
    for block in m.blocks:
        x = block(x, cos, sin)
    return x


def test_mssp_at_its_base_width_is_standard():
    base, standard = model(128, "mssp"), model(128)
    for a, b in zip(base.state_dict().values(), standard.state_dict().values()):
        assert torch.equal(a, b)
    assert groups(build_optimizers(base, CFG)) == groups(build_optimizers(standard, CFG))


@pytest.mark.parametrize("d", [64, 256])
def test_mssp_multipliers(d):
    m = d / 128
    mssp, standard = model(d, "mssp"), model(d)
    named = dict(mssp.named_parameters())
    standard_named = dict(standard.named_parameters())
    # init: fixed-std matrices drawn at 0.02 / √m from the same random numbers; the rest untouched
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.attn.out.weight", "blocks.0.ffw.up.weight",
                 "blocks.0.ffw.down.weight"):
        torch.testing.assert_close(named[name], standard_named[name] * m**-0.5, rtol=0, atol=0)
    for name in ("embed.weight", "blocks.1.ffw.expert_down", "blocks.1.ffw.expert_up", "blocks.1.ffw.query.weight",
                 "blocks.1.ffw.sub_keys1", "blocks.0.attn_norm.weight"):
        assert torch.equal(named[name], standard_named[name]), name
    # learning rates: hidden matrices (and PEER's u_i) at lr / m; embeddings, norms, keys and v_i at lr
    optimizers = build_optimizers(mssp, CFG)
    lr_of = {id(p): g["lr"] for opt in (optimizers.dense, optimizers.experts) for g in opt.param_groups
             for p in g["params"]}
    expected = {"blocks.0.attn.qkv.weight": 1e-3 / m, "blocks.0.ffw.down.weight": 1e-3 / m,
                "blocks.1.ffw.query.weight": 1e-3 / m, "blocks.1.ffw.expert_down": 4e-3 / m,
                "blocks.1.ffw.expert_up": 4e-3, "blocks.1.ffw.sub_keys1": 1e-3, "embed.weight": 1e-3,
                "blocks.0.attn_norm.weight": 1e-3, "blocks.1.ffw.query_norm.weight": 1e-3}
    for name, lr in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(lr, rel=1e-12), name
    # the logits: × 1 / m
    tokens = torch.randint(0, 259, (1, 8))
    mssp.eval()
    x = _blocks(mssp, mssp.embed(tokens))
    torch.testing.assert_close(mssp(tokens), mssp.lm_head(mssp.norm(x)) / m)


def test_mssp_covers_moe_experts_and_multiplies_callers_scales():
    moe = model(256, "mssp", ffw="moe", moe=MoEConfig(num_experts=4, top_k=2))
    standard = model(256, ffw="moe", moe=MoEConfig(num_experts=4, top_k=2))
    layer, plain = moe.expert_layers()[1], standard.expert_layers()[1]
    torch.testing.assert_close(layer.w_up, plain.w_up * 2**-0.5, rtol=0, atol=0)
    assert {id(layer.w_up), id(layer.w_down), id(layer.router.weight)} <= hidden_matrices(moe)
    scales = {id(layer.w_up): 0.5}
    optimizers = build_optimizers(moe, CFG, scales)
    lr_of = {id(p): g["lr"] for g in optimizers.dense.param_groups for p in g["params"]}
    assert lr_of[id(layer.w_up)] == pytest.approx(1e-3 * 0.5 / 2)
    assert lr_of[id(layer.w_down)] == pytest.approx(1e-3 / 2)
    assert scales == {id(layer.w_up): 0.5}  # the caller's mapping is not modified


def test_gpu_presets_scale_from_the_cpu_small_width():
    from peer_model.presets import PRESETS

    base = PRESETS["cpu-small"]
    assert base.parameterization == "standard"
    for name in ("gpu-base", "gpu-large"):
        config = PRESETS[name]
        assert (config.parameterization, config.mssp_base_width) == ("mssp", base.d_model)
