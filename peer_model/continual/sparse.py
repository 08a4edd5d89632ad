"""Sparse memory finetuning (Lin et al. 2025): which experts train, ranked by TF-IDF of their usage on the new
corpus against earlier ones, per batch (:class:`BatchSparseSelection`) or once per stage (:func:`expert_scores`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..distributed.shards import ColumnShards
from ..model import PEERTransformer
from ..optim import coalesced
from ..train import TokenData, autocast_for
from .data import MixedData


@torch.no_grad()
def _count_usage(model: PEERTransformer, data, batches: int, batch_size: int, seq_len: int,
                 generator: torch.Generator, per_batch: bool) -> dict[int, torch.Tensor]:
    """Per PEER layer: selections per expert over ``batches`` sampled batches (eval mode), or, with
    ``per_batch``, the number of batches in which each expert was selected (a document frequency)."""
    device = next(model.parameters()).device
    layers = model.peer_layers()
    saved = {i: (layer.track_usage, layer.usage_counts.clone()) for i, layer in layers.items()}
    totals = {i: torch.zeros_like(layer.usage_counts) for i, layer in layers.items()}
    was_training = model.training
    model.eval()
    try:
        for layer in layers.values():
            layer.track_usage = True
        for _ in range(batches):
            for layer in layers.values():
                layer.reset_usage()
            inputs = data.sample_batch(batch_size, seq_len, generator)[0]
            with autocast_for(device):
                model(inputs.to(device))
            for i, layer in layers.items():
                totals[i] += (layer.usage_counts > 0).long() if per_batch else layer.usage_counts
    finally:
        model.train(was_training)
        for i, layer in layers.items():
            layer.track_usage, counts = saved[i]
            layer.usage_counts.copy_(counts)
    return totals



def background_frequency(model: PEERTransformer, new: TokenData, old: Sequence[TokenData], batches: int,
                         batch_size: int, seq_len: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """Per PEER layer, the IDF of every expert: log((B + 1) / (df + 1)) where df counts the B batches
    of old data (earlier corpora mixed alike) in which the expert was selected at least once; experts
    the old data uses everywhere get ~0. With no old data, 1 for every expert."""
    generator = torch.Generator().manual_seed(seed)
    if not old:
        return {i: torch.ones(layer.num_experts, dtype=torch.float64) for i, layer in model.peer_layers().items()}
    df = _count_usage(model, MixedData(new, old, 1.0), batches, batch_size, seq_len, generator, per_batch=True)
    return {i: torch.log((batches + 1) / (counts.double() + 1)) for i, counts in df.items()}



def expert_scores(model: PEERTransformer, new: TokenData, old: Sequence[TokenData], batches: int,
                  batch_size: int, seq_len: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """TF-IDF score of every expert of every PEER layer for the new corpus against the earlier ones.

    TF = the expert's share of all selections over ``batches`` batches of new data; IDF: see
    :func:`background_frequency`. This is the ranking of Sparse Memory Finetuning (Lin et al. 2025,
    memory slots there, experts here) computed once per stage from samples; :class:`BatchSparseSelection`
    computes it per training batch, as the paper does. With no old data the ranking is plain usage.
    """
    generator = torch.Generator().manual_seed(seed)
    tf = _count_usage(model, new, batches, batch_size, seq_len, generator, per_batch=False)
    idf = background_frequency(model, new, old, batches, batch_size, seq_len, seed=seed + 1)
    return {i: counts.double() / max(1, int(counts.sum())) * idf[i] for i, counts in tf.items()}



class BatchSparseSelection:
    """Sparse Memory Finetuning per batch (Lin et al. 2025): after each backward, every PEER layer keeps
    the gradient rows of only the ``top`` experts with the best TF-IDF of this batch's selections (TF:
    the layer's usage counts of the step, IDF: ``idf`` from :func:`background_frequency`), and of any
    expert grown after ``idf`` was taken; the optimizer then touches no other row, so the rest stay
    bit-identical. Needs usage tracking on during training (``TrainConfig.track_usage``).
    ``trained``: per layer, every expert that was kept at least once. With ``shards`` (a model sharded over
    processes, each training on its rows of the batch) the counts are summed over the processes first, so
    that every process keeps the same rows."""

    def __init__(self, model: PEERTransformer, idf: Mapping[int, torch.Tensor], top: int,
                 shards: ColumnShards | None = None):
        self.layers = model.peer_layers()
        self.idf, self.top, self.shards = dict(idf), top, shards
        self.kept = {i: torch.zeros(layer.num_experts, dtype=torch.bool) for i, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.reset_usage()

    @property
    def trained(self) -> dict[int, torch.Tensor]:
        return {i: torch.nonzero(kept).squeeze(1) for i, kept in self.kept.items()}

    @torch.no_grad()
    def __call__(self) -> None:
        for i, layer in self.layers.items():
            counts = layer.usage_counts if self.shards is None else self.shards.all_reduce_(layer.usage_counts.clone())
            counts = counts.cpu()
            old = self.idf[i].numel()
            keep = torch.zeros(layer.num_experts, dtype=torch.bool)
            keep[select_experts(counts[:old].double() / max(1, int(counts.sum())) * self.idf[i], self.top)] = True
            keep[old:] = True
            if len(self.kept[i]) < len(keep):
                self.kept[i] = torch.cat([self.kept[i], self.kept[i].new_zeros(len(keep) - len(self.kept[i]))])
            self.kept[i] |= keep & (counts > 0)
            keep = keep.to(layer.usage_counts.device)
            for table in (layer.expert_down, layer.expert_up):
                if table.grad is not None:
                    table.grad = _sparse_rows_kept(coalesced(table.grad), keep)
            layer.reset_usage()



def _sparse_rows_kept(grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    rows, values = grad.indices()[0], grad.values()
    mask = keep[rows]
    return torch.sparse_coo_tensor(rows[mask].unsqueeze(0), values[mask], grad.shape, is_coalesced=True,
                                   check_invariants=False)



def select_experts(scores: torch.Tensor, top: int) -> torch.Tensor:
    """Ids of the ``top`` best-scoring experts with a positive score, best first (ties: lower id)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:top]
    return order[scores[order] > 0]



def selection_share(model: PEERTransformer, data: TokenData, first_id: Mapping[int, int], batches: int,
                    batch_size: int, seq_len: int, seed: int = 0) -> float:
    """Fraction of all expert selections on ``data`` (eval mode, all PEER layers) that land on experts
    with id >= ``first_id[layer]``: with the base model's expert counts and an old corpus, how much of
    the old text's routing has moved to experts grown since (0 = old inputs still find only old experts).
    """
    counts = _count_usage(model, data, batches, batch_size, seq_len, torch.Generator().manual_seed(seed),
                          per_batch=False)
    total = sum(int(c.sum()) for c in counts.values())
    return sum(int(c[first_id[i]:].sum()) for i, c in counts.items()) / max(1, total)
