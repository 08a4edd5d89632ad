"""Which columns of a table each process holds, and the collectives of the column-sharded expert mix.

Every collective here counts the bytes this process sends to the others (:class:`Traffic`), as the
textbook algorithms send them: an all-to-all sends what is addressed to other ranks, an all-gather sends
this rank's block to R − 1 ranks, an all-reduce of P bytes sends 2 (R − 1) / R · P (ring). That is what
BENCHMARKS.md and docs/scaling.md report as bytes exchanged per step.

Tokens may differ in number between processes (a last, shorter batch): the row counts are exchanged
first, and the all-to-alls take uneven splits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    bytes_sent: int = 0
    collectives: int = 0

    def add(self, nbytes: int) -> None:
        self.bytes_sent += int(nbytes)
        self.collectives += 1


def column_range(width: int, parts: int, index: int) -> tuple[int, int]:
    """Columns ``[start, stop)`` of part ``index`` when ``width`` columns are cut into ``parts`` contiguous
    ranges whose sizes differ by at most one (the first ``width % parts`` are one wider)."""
    base, extra = divmod(width, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


class ColumnShards:
    """This process' place in ``group`` (default: the whole world): it holds columns
    ``column_range(width, size, rank)`` of every expert table. Shared by all the sharded layers of a model;
    ``traffic`` counts what their collectives send."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.traffic = Traffic()

    def __deepcopy__(self, memo: dict) -> "ColumnShards":
        """A copy of a sharded model (a teacher, a child to grow) is sharded over the same processes."""
        return self

    def columns(self, width: int, rank: int | None = None) -> tuple[int, int]:
        return column_range(width, self.size, self.rank if rank is None else rank)

    # ---- reductions ---------------------------------------------------------------------------------

    def all_reduce_(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In place over the group; returns ``tensor``."""
        if self.size > 1:
            self.traffic.add(2 * (self.size - 1) * tensor.numel() * tensor.element_size() // self.size)
            dist.all_reduce(tensor, op, group=self.group)
        return tensor

    def row_means(self, sums: torch.Tensor, width: int) -> torch.Tensor:
        """sums: (rows,), each row's sum over this process' ``width`` columns of a table → each row's mean
        over all its columns, every shard's included (SparseRowAdam's second moment, peer_model/optim.py)."""
        totals = self.all_reduce_(torch.cat([sums, sums.new_full((1,), float(width))]))
        return totals[:-1] / totals[-1]

    # ---- the expert mix's exchanges -----------------------------------------------------------------

    def row_counts(self, rows: int, device: torch.device) -> list[int]:
        """Every rank's number of tokens (its own included)."""
        if self.size == 1:
            return [rows]
        counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.size)]
        mine = torch.tensor([rows], dtype=torch.long, device=device)
        self.traffic.add((self.size - 1) * mine.element_size())
        dist.all_gather(counts, mine, group=self.group)
        return [int(c) for c in counts]

    def all_gather_rows(self, tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(counts[rank], ...) on every rank → (sum(counts), ...), rank order. Blocks are padded to the largest."""
        if self.size == 1:
            return tensor
        longest = max(counts)
        padded = tensor.new_zeros(longest, *tensor.shape[1:])
        padded[: tensor.shape[0]] = tensor
        blocks = [torch.empty_like(padded) for _ in range(self.size)]
        self.traffic.add((self.size - 1) * padded.numel() * padded.element_size())
        dist.all_gather(blocks, padded, group=self.group)
        return torch.cat([block[:n] for block, n in zip(blocks, counts)])

    def scatter_columns(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """This rank's tokens with all columns, (counts[rank], d) → every rank's tokens with this rank's
        columns, (sum(counts), d_own): an all-to-all."""
        if self.size == 1:
            return x
        width = x.shape[1]
        ranges = [self.columns(width, r) for r in range(self.size)]
        send = torch.cat([x[:, a:b].reshape(-1) for a, b in ranges])
        own = ranges[self.rank][1] - ranges[self.rank][0]
        received = send.new_empty(sum(counts) * own)
        self.traffic.add(x.shape[0] * (width - own) * x.element_size())
        dist.all_to_all_single(received, send, [n * own for n in counts],
                               [x.shape[0] * (b - a) for a, b in ranges], group=self.group)
        return received.view(sum(counts), own)

    def gather_columns(self, y: torch.Tensor, counts: list[int], width: int) -> torch.Tensor:
        """The inverse of :meth:`scatter_columns`: every rank's tokens with this rank's columns,
        (sum(counts), d_own) → this rank's tokens with all columns, (counts[rank], width)."""
        if self.size == 1:
            return y
        ranges = [self.columns(width, r) for r in range(self.size)]
        mine = counts[self.rank]
        own = y.shape[1]
        received = y.new_empty(mine * width)
        self.traffic.add((y.shape[0] - mine) * own * y.element_size())
        dist.all_to_all_single(received, y.contiguous().view(-1), [mine * (b - a) for a, b in ranges],
                               [n * own for n in counts], group=self.group)
        blocks = received.split([mine * (b - a) for a, b in ranges])
        return torch.cat([block.view(mine, b - a) for block, (a, b) in zip(blocks, ranges)], dim=1)
