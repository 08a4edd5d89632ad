"""The decode weight formats (peer_model/quantize.py) against plain fp32 arithmetic on dequantized weights."""
import pytest
import torch
from torch import nn

from peer_model.batching import BatchDecoder
from peer_model.config import ModelConfig, PEERConfig
from peer_model.generate import SamplingParams
from peer_model.model import PEERTransformer
from peer_model.quantize import (BFloat16Linear, Int8WeightOnlyLinear, RescoredOutput, convert_linears,
                                 int8_per_channel)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def test_int8_per_channel_rounds_each_weight_to_its_rows_grid():
    torch.manual_seed(0)
    weight = torch.randn(24, 64) * torch.logspace(-2, 1, 24).unsqueeze(1)  # rows of very different scales
    q, scales = int8_per_channel(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert bool(((q.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_int8_linear_equals_the_product_with_dequantized_weights(rows):
    torch.manual_seed(rows)
    linear = nn.Linear(64, 48, bias=True)
    x = torch.randn(2, rows, 64)
    q, scales = int8_per_channel(linear.weight)
    # the kernel's inputs: x and the scales in bf16, products accumulated in fp32, the output rounded to bf16
    expected = bf16(bf16(x) @ q.float().t() * bf16(scales) + bf16(linear.bias))
    out = Int8WeightOnlyLinear(linear, max_rows=None)(x)
    assert out.dtype == torch.float32 and out.shape == (2, rows, 48)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, linear(x).detach(), rtol=0.05, atol=0.05)  # int8's own rounding


def test_int8_linear_runs_calls_of_many_rows_through_its_bf16_copy():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=False)
    layer, plain = Int8WeightOnlyLinear(linear, max_rows=2), BFloat16Linear(linear)
    many, few = torch.randn(3, 32), torch.randn(2, 32)
    assert torch.equal(layer(many), plain(many))
    assert torch.equal(layer(few), Int8WeightOnlyLinear(linear, max_rows=None)(few))


def test_bfloat16_linear_rounds_weights_and_inputs_to_bf16():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    x = torch.randn(5, 40)
    expected = bf16(bf16(x) @ bf16(linear.weight).t() + bf16(linear.bias))
    torch.testing.assert_close(BFloat16Linear(linear)(x), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fast", [BFloat16Linear, lambda linear: Int8WeightOnlyLinear(linear, max_rows=None)])
def test_rescored_output_takes_its_top_logits_from_fp32_and_breaks_bf16_ties(fast):
    """Logits of 25.20 and 25.21 come back from either kernel as the same bf16 value (a multiple of 0.125), so the
    fast layer ties them and its argmax is the lower id; the rescored layer gives fp32's logits for its top k, so
    fp32's argmax, and the fast logits elsewhere."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 40, bias=False)
    x = torch.randn(3, 16)
    x[0] = 0
    x[0, 0] = 1
    with torch.no_grad():
        linear.weight.mul_(0.1)
        linear.weight[3, 0], linear.weight[7, 0] = 25.20, 25.21
        expected = linear(x)
    plain = fast(linear)
    rounded = plain(x)
    assert rounded[0, 3] == rounded[0, 7] and int(rounded[0].argmax()) == 3
    layer = RescoredOutput(plain, linear.weight, None, top_k=4)
    got = layer(x)
    assert int(got[0].argmax()) == 7 == int(expected[0].argmax())
    top = rounded.topk(4, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, top), expected.gather(-1, top), rtol=1e-6, atol=1e-6)
    rest = torch.ones_like(got, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(got[rest], rounded[rest])


def test_rescored_output_keeps_the_bias_and_the_input_shape():
    torch.manual_seed(1)
    linear = nn.Linear(32, 24, bias=True)
    x = torch.randn(2, 5, 32)
    layer = RescoredOutput(BFloat16Linear(linear), linear.weight, linear.bias, top_k=24)  # every logit rescored
    torch.testing.assert_close(layer(x), linear(x).detach(), rtol=1e-6, atol=1e-6)


def tiny_model() -> PEERTransformer:
    torch.manual_seed(0)
    config = ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=136, max_seq_len=64, peer_layers=[1],
                         peer=PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16), tie_embeddings=True)
    return PEERTransformer(config).eval()


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_convert_linears_swaps_the_base_and_keeps_the_expert_layers(weights):
    model = tiny_model()
    peer = model.blocks[1].expert_layer
    with torch.no_grad():  # as a retrofit starts: a random pool flips near-tied selections, which is not the point
        peer.expert_up.zero_()
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = model(tokens)
    query = peer.query
    convert_linears(model, weights, int8_max_rows=4)
    assert peer.query is query and peer.expert_down.dtype == torch.float32  # expert layers stay fp32
    assert model.embed.weight.dtype == torch.float32  # the tied table stays for the lookup
    assert isinstance(model.lm_head, RescoredOutput)  # and rescores the top logits: no fp32 copy of it is made
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    kinds = {name: type(m) for name, m in model.named_modules() if name.startswith("blocks.0.")}
    assert kinds["blocks.0.attn.qkv"] is (Int8WeightOnlyLinear if weights == "int8" else BFloat16Linear)
    assert kinds["blocks.0.ffw.down"] is BFloat16Linear  # 136 inputs: not a whole number of int8 blocks
    assert not any(isinstance(m, nn.Linear) for name, m in model.named_modules()
                   if not name.startswith("blocks.1.ffw") and not name.startswith("blocks.1.expert"))
    with torch.no_grad():
        error = (model(tokens) - expected).norm() / expected.norm()
    assert 0 < error < 0.02
    decoder = BatchDecoder(model, 2)  # the served path: one token per step for every row
    for prompt in ([3, 4, 5], [7]):
        decoder.add(prompt, SamplingParams(max_tokens=5, temperature=0))
    steps = [decoder.step() for _ in range(5)]
    assert [len(s) for s in steps] == [2] * 5


def test_convert_linears_refuses_unknown_formats():
    with pytest.raises(ValueError, match="weights must be one of"):
        convert_linears(tiny_model(), "fp8")
    with pytest.raises(ValueError, match="exact_top_k must be >= 0"):
        convert_linears(tiny_model(), "int8", exact_top_k=-1)
    assert convert_linears(model := tiny_model(), "float32") is model
    fast_only = convert_linears(tiny_model(), "bfloat16", exact_top_k=0)  # PEER_SERVE_EXACT_TOP_K=0: no rescoring
    assert isinstance(fast_only.lm_head, BFloat16Linear)
