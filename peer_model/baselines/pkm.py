"""Product-key memory (Lample et al. 2019, "Large Memory Layers with Product Keys"), the PKM baseline of
the PEER paper (1024² memories, 8 heads, top-32 per head, query BatchNorm).

For each token x and each of h heads: q = BatchNorm(W_q x) split in two halves; the k memories with the
best product-key scores are retrieved exactly (:func:`~peer_model.retrieval.multihead_retrieve`, as PEER);
w = softmax over their k scores; the layer returns Σ_heads Σ_k w · values[id].

Differences from PEER and from the original PKM, on purpose:

* memories are value vectors (a row of ``values``, added as is), not single-neuron experts σ(u·x) v;
* the two sub-key tables are shared by all heads, like our PEER layer (the original PKM has one pair of
  sub-key tables per head);
* the value table gets a dense gradient (``F.embedding_bag`` with ``sparse=False``) and is trained by
  the dense optimizer, unlike PEER's sparse-row path (``experts.expert_mix`` + ``SparseRowAdam``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PKMConfig
from ..pool import ExpertGrid
from ..retrieval import multihead_retrieve


class ProductKeyMemory(nn.Module):
    aux_loss = None

    def __init__(self, d_model: int, config: PKMConfig):
        super().__init__()
        self.config = config
        self.d_model = d_model
        side = round(config.num_memories**0.5)
        self.grid = ExpertGrid.square(side)  # memory id = i * side + j
        half = config.d_key // 2
        self.query = nn.Linear(d_model, config.heads * config.d_key, bias=False)
        self.query_norm = nn.BatchNorm1d(config.heads * config.d_key) if config.query_batchnorm else nn.Identity()
        self.sub_keys1 = nn.Parameter(torch.randn(side, half) * half**-0.5)  # shared by all heads
        self.sub_keys2 = nn.Parameter(torch.randn(side, half) * half**-0.5)
        self.values = nn.Parameter(torch.randn(config.num_memories, d_model) * d_model**-0.5)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (M, d) → (weights, ids), both (M, heads * k); weights sum to 1 within each head."""
        cfg = self.config
        return multihead_retrieve(self.query_norm(self.query(x)), self.sub_keys1, self.sub_keys2, self.grid,
                                  cfg.d_key, cfg.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        weights, ids = self.route(x)
        out = F.embedding_bag(ids, self.values, per_sample_weights=weights.to(self.values.dtype), mode="sum")
        return out.view(shape).to(x.dtype)
