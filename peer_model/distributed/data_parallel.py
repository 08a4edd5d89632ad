"""Data parallelism for everything but the sharded expert tables.

Every process holds a replica of the dense part (attention, norms, embeddings, the PEER routers) and
trains on its share of each global batch. After the backward the replicas' gradients are all-reduced
(one flat buffer) and averaged, the BatchNorm running statistics and DA-MoE's running scale with them, so
the replicas stay equal step after step. The expert-table shards need no reduction: the column-sharded mix
already summed every process' tokens into each shard's gradient (peer_model/distributed/expert_mix.py);
they are only divided by the number of processes, so that every gradient is that of the mean loss over the
global batch.

With ``batches``, every process samples the same global batch (same generator) and keeps its slice:
a run on R processes takes the optimisation steps a run on one process with the same global batch size
takes (up to what is computed from each process' own rows, as under DistributedDataParallel: BatchNorm's
batch statistics, and DA-MoE's scale calibrated on the batch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..dynamic_k import DynamicK
from .shards import ColumnShards


class RankBatches:
    """``data`` whose ``sample_batch`` returns this process' rows of the global batch."""

    def __init__(self, data, rank: int, size: int):
        self.data, self.rank, self.size = data, rank, size

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator | None = None):
        if batch_size % self.size:
            raise ValueError(f"the batch size {batch_size} must be a multiple of the {self.size} processes")
        rows = slice(self.rank * batch_size // self.size, (self.rank + 1) * batch_size // self.size)
        return tuple(t[rows] for t in self.data.sample_batch(batch_size, seq_len, generator))


class DataParallel:
    """The replicated part of ``model`` (whose PEER layers are sharded over ``shards``) kept in step."""

    def __init__(self, model: nn.Module, shards: ColumnShards):
        self.model, self.shards = model, shards

    @property
    def rank(self) -> int:
        return self.shards.rank

    @property
    def size(self) -> int:
        return self.shards.size

    def batches(self, data) -> RankBatches:
        return RankBatches(data, self.rank, self.size)

    def _replicas(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if getattr(p, "column_shards", None) is None]

    def _running_stats(self) -> list[torch.Tensor]:
        """Buffers each process updates from its own rows of a batch: BatchNorm's running statistics and
        DA-MoE's running scale (peer_model/dynamic_k.py)."""
        stats = []
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                stats += [stat for stat in (module.running_mean, module.running_var) if stat is not None]
            elif isinstance(module, DynamicK):
                stats.append(module.scale)
        return stats

    @torch.no_grad()
    def broadcast_replicas(self) -> None:
        """Rank 0's replicated parameters and BatchNorm statistics to every process (e.g. after sub-keys
        were keyed on each process' own data)."""
        group = self.shards.group
        source = 0 if group is None else dist.get_global_rank(group, 0)
        for tensor in self._replicas() + self._running_stats():
            dist.broadcast(tensor.data, source, group=group)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the replicas' gradients and BatchNorm running statistics over the processes; divide the
        shards' gradients by the number of processes. Every process must train the same parameters."""
        dense = [p.grad for p in self._replicas() if p.grad is not None] + self._running_stats()
        if dense:
            flat = self.shards.all_reduce_(_flatten_dense_tensors(dense)).div_(self.size)
            for tensor, reduced in zip(dense, _unflatten_dense_tensors(flat, dense)):
                tensor.copy_(reduced)
        for param in self.model.parameters():
            if param.grad is not None and getattr(param, "column_shards", None) is not None:
                param.grad.mul_(1.0 / self.size)

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (e.g. the training loss, for the log)."""
        total = torch.tensor([float(value)], dtype=torch.float64, device=next(self.model.parameters()).device)
        return float(self.shards.all_reduce_(total)) / self.size
