"""Weight formats for decoding on CPU: the base's linear layers in fp32, bf16, or int8 with per-channel scales.

Decoding a small batch reads every weight once per token, so its speed is memory bandwidth: SmolLM2-135M's
540 MB of fp32 weights take ~50 ms a token at the ~10 GB/s one core streams here. As gpt-fast's
``quantize.py`` does, a format is a module swap of ``nn.Linear`` (:func:`convert_linears`):

* ``bfloat16``: the weight in bf16, the input rounded to bf16, the product accumulated in fp32 (oneDNN);
* ``int8``: weight-only int8, one scale per output channel (symmetric: ``w ≈ scale · q``, |q| ≤ 127), through
  ``torch._weight_int8pack_mm``. Its input is bf16: the fp32-input kernel is a slow fallback (measured 10×
  slower than fp32 ``F.linear`` on this machine). That kernel is a matrix-vector product: it wins while a call
  has a few rows (one decode step of a few clients: 2-3× faster than fp32 here) and loses to oneDNN's bf16
  matrix product beyond (2.5× slower at 32 rows, worse for a prompt's prefill). So an int8 layer also keeps a
  bf16 copy of its weight for calls of more than ``int8_max_rows`` rows (3 bytes per weight in all, still
  less than fp32's 4); ``int8_max_rows=None`` keeps int8 alone, for every call (how its quality is measured).

Only the linears outside the expert layers change: the embeddings, norms, RoPE, attention arithmetic, the
residual stream, the KV cache and every PEER layer stay fp32, and retrieval scores in fp32 whatever the weights
(retrieval.py). Each output returns in the input's dtype. Both kernels round their output to bf16, which the
output layer cannot afford: :class:`RescoredOutput` recomputes its top logits in fp32. The quality cost of each
format is measured in bits per byte (benchmarks/serve_base.py, BENCHMARKS.md); inference only: a converted layer
has no trainable weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")
INT8_BLOCK = 16  # torch._weight_int8pack_mm on CPU needs in_features divisible by this


class BFloat16Linear(nn.Module):
    """``F.linear`` with the weight kept in bf16 and the input rounded to bf16; the output in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight → (int8 q, fp32 scales (out,)) with ``weight ≈ scales[:, None] · q``, |q| ≤ 127."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales


class Int8WeightOnlyLinear(nn.Module):
    """Weight-only int8 with per-channel scales: ``y = (bf16(x) @ qᵀ) · scales + bias`` for calls of at most
    ``max_rows`` rows; larger calls run :class:`BFloat16Linear`'s product on a bf16 copy of the weight (None:
    int8 for every call, no copy kept)."""

    def __init__(self, linear: nn.Linear, max_rows: int | None):
        super().__init__()
        q, scales = int8_per_channel(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        self.max_rows = max_rows
        self.dense = None if max_rows is None else BFloat16Linear(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.dense is not None and flat.shape[0] > self.max_rows:
            return self.dense(x)
        y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.weight.shape[0])


class RescoredOutput(nn.Module):
    """An output layer in a fast format (``fast``) whose ``top_k`` largest logits in every row are recomputed in
    fp32 from ``weight`` (and ``bias``), the layer's own fp32 parameters; the other logits keep the fast values.

    The bf16 and int8 kernels round their output to bf16: a logit near 25 comes back as a multiple of 0.125, so
    tokens whose logits are close tie and greedy decoding takes the lower id. On SmolLM2 that tied the top two
    tokens at 5% of the positions of ordinary text, and turned the chat reply to "What is the capital of France?"
    (fp32's top two logits 0.08 apart) from "The capital of France is Paris." into "L'Étoile, ...". The fast
    product only has to rank the winner among its ``top_k`` (its error was at most 0.73 on such text, against
    logit gaps of several units to the 64th token); fp32 then decides. For a tied output layer ``weight`` is the
    embedding table, which stays fp32 for the lookup anyway: no memory is added."""

    def __init__(self, fast: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.fast, self.top_k = fast, top_k
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fast(x)
        flat, vocab = x.reshape(-1, x.shape[-1]), logits.shape[-1]
        top = logits.reshape(-1, vocab).topk(min(self.top_k, vocab), dim=-1).indices  # (n, k)
        exact = torch.bmm(self.weight[top].to(x.dtype), flat.unsqueeze(-1)).squeeze(-1)
        if self.bias is not None:
            exact = exact + self.bias[top].to(x.dtype)
        return logits.reshape(-1, vocab).scatter_(-1, top, exact).view(logits.shape)


def convert_linears(model: nn.Module, weights: str, int8_max_rows: int | None = 4,
                    exact_top_k: int = 64) -> nn.Module:
    """Swap, in place, every ``nn.Linear`` of ``model`` outside its expert layers (``model.expert_layers()``,
    when it has them) for the ``weights`` format (:data:`WEIGHT_FORMATS`; ``float32`` changes nothing);
    returns ``model``. A tied output layer gets its own copy (the embedding table stays fp32).
    ``int8_max_rows``: see :class:`Int8WeightOnlyLinear`. The output layer (``model.lm_head``) becomes a
    :class:`RescoredOutput` with ``exact_top_k`` logits recomputed in fp32 (0: the fast logits alone)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights == "float32":
        return model
    if int8_max_rows is not None and int8_max_rows < 1:
        raise ValueError(f"int8_max_rows must be None or >= 1, got {int8_max_rows}")
    if exact_top_k < 0:
        raise ValueError(f"exact_top_k must be >= 0, got {exact_top_k}")
    experts = getattr(model, "expert_layers", dict)().values()
    kept = {id(m) for layer in experts for m in layer.modules()}
    output = getattr(model, "lm_head", None)
    for parent in list(model.modules()):
        if id(parent) in kept:
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) not in kept:
                fast = _converted(child, weights, int8_max_rows)
                if child is output and exact_top_k:
                    fast = RescoredOutput(fast, child.weight, child.bias, exact_top_k)
                setattr(parent, name, fast)
    return model


def _converted(linear: nn.Linear, weights: str, int8_max_rows: int | None) -> nn.Module:
    """An int8 layer where torch's kernel can take it: it reads the input dimension in blocks of
    :data:`INT8_BLOCK` (torch 2.13, measured: K = 40 gave wrong sums, K = 30 crashed); else bf16."""
    if weights == "int8" and linear.in_features % INT8_BLOCK == 0:
        return Int8WeightOnlyLinear(linear, int8_max_rows)
    return BFloat16Linear(linear)
