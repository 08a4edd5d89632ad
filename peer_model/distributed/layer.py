"""``shard_peer_layers``: the parallelize step for PEER models (torchtitan's style).

It is applied to a plain model, on a real device or on the meta device before a checkpoint is loaded
(peer_model/checkpoint.py ``load_checkpoint(..., parallelize=...)``), and turns every PEER layer into a
:class:`ShardedPEER`, the way FSDP2's ``fully_shard`` swaps a module's class: the same module, the same
parameters by name, its expert tables cut to this process' columns. The model code does not change.

Routing (query projection, BatchNorm, sub-keys) stays replicated: each process routes its own tokens.
Growth appends rows to every shard at once, and the grid, segments, trainable mask and usage counters
stay full-size on every process (they are per row, and every process holds every row).
"""
from __future__ import annotations

import torch
from torch import nn

from ..peer import PEER
from .expert_mix import column_sharded_expert_mix
from .shards import ColumnShards

# Growth draws new down-vectors full-width in blocks of rows this large (64 MiB of fp32): a multiple of
# 16 rows keeps the CPU generator's stream the one a single full draw gives (see _grow_expert_tables)
_DRAW_ELEMENTS = 16 * 1024 * 1024


class ShardedPEER(PEER):
    """A PEER layer whose ``expert_down``/``expert_up`` hold columns ``shards.columns(expert_width)`` of
    the full tables (``expert_width`` wide). Made by :func:`shard_peer_layers`, never built directly."""

    shards: ColumnShards
    expert_width: int

    def mix(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        frozen_rows = self.trainable if self._frozen_rows else None
        return column_sharded_expert_mix(x, ids, gates, self.expert_down, self.expert_up, self.shards,
                                         self.config.activation, frozen_rows)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        super().init_buffers(device)
        self._tag_tables()  # a checkpoint load assigns new parameter objects, then calls this

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._tag_tables()  # a deep copy's tables are new parameters, without the tag

    def _tag_tables(self) -> None:
        """Mark both tables as column shards: SparseRowAdam then takes each row's second moment over all
        columns and gradient clipping sums their norms over the group (peer_model/optim.py, train.py)."""
        for table in (self.expert_down, self.expert_up):
            table.column_shards = self.shards

    @torch.no_grad()
    def _grow_expert_tables(self, rows: int, generator: torch.Generator | None = None) -> None:
        """As :meth:`PEER._grow_expert_tables`, for the whole table: the new down-vectors' scale is the RMS
        of every shard, and each process draws the full rows (as many random numbers as one process would,
        so every process' generator stays in step) and keeps its columns. On CPU these are the numbers an
        unsharded layer's growth draws (up to the rounding of their scale); on a GPU, the same distribution."""
        old, width = self.expert_down.shape[0], self.expert_width
        start, stop = self.shards.columns(width)
        squares = self.expert_down.detach().float().pow(2).sum().reshape(1)
        rms = (self.shards.all_reduce_(squares) / (old * width)).sqrt().item()
        down = self.expert_down.detach().new_empty(rows, stop - start)
        down[:old] = self.expert_down.detach()
        block = max(16, _DRAW_ELEMENTS // width // 16 * 16)
        for first in range(old, rows, block):
            last = min(rows, first + block)
            full = torch.empty(last - first, width, dtype=down.dtype, device=down.device)
            full.normal_(0.0, rms, generator=generator)
            down[first:last] = full[:, start:stop]
        up = self.expert_up.detach().new_zeros(rows, stop - start)
        up[:old] = self.expert_up.detach()
        self.expert_down = nn.Parameter(down, requires_grad=self.expert_down.requires_grad)
        self.expert_up = nn.Parameter(up, requires_grad=self.expert_up.requires_grad)
        self._tag_tables()

    @torch.no_grad()
    def _score_margin(self, queries: torch.Tensor) -> torch.Tensor:
        """The largest margin of any process' batch: every process opens new segments at the same pace."""
        return self.shards.all_reduce_(super()._score_margin(queries).float().reshape(1),
                                       torch.distributed.ReduceOp.MAX).reshape(())


def shard_peer_layers(model: nn.Module, shards: ColumnShards) -> list[ShardedPEER]:
    """Keep only this process' columns of every PEER layer's expert tables (in place); returns the layers.

    Every process must call it on the same model (same weights, or the meta device before loading).
    """
    layers = []
    for module in model.modules():
        if isinstance(module, PEER) and not isinstance(module, ShardedPEER):
            module.expert_width = module.expert_down.shape[1]
            start, stop = shards.columns(module.expert_width)
            module.__class__ = ShardedPEER
            module.shards = shards
            for name in ("expert_down", "expert_up"):
                table = getattr(module, name)
                setattr(module, name, nn.Parameter(table.detach()[:, start:stop].clone(),
                                                   requires_grad=table.requires_grad))
            module._tag_tables()
            layers.append(module)
    return layers
