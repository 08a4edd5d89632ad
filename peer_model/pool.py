"""Stable expert ids on a growable product-key grid.

PEER retrieves experts by product keys: expert (i, j) sits on a rows × cols grid and its key is the
concatenation of sub-key i of the first half and sub-key j of the second. The usual numbering
``id = i * cols + j`` would renumber every expert whenever ``cols`` grows, so the pool numbers the grid
in *segments* instead:

* segment 0 is the initial ``rows0 × cols0`` grid, numbered row-major (``id = i * cols0 + j``);
* growth appends sub-keys to either half (``rows_s ≥ rows_{s-1}``, ``cols_s ≥ cols_{s-1}``); the new
  cells are exactly the L-shaped region ``[0, rows_s) × [0, cols_s) \\ [0, rows_{s-1}) × [0, cols_{s-1})``
  and get the ids that follow every older id: first the new columns of the old rows
  (``i < rows_{s-1}``, row-major), then the new rows in full (row-major).

Every cell of the current grid is an expert, so product-key top-k over the grid stays exact and costs
O((rows + cols + k²) · d_key); an id, once given, never changes.

A segment has a retrieval *status*: ``active`` experts compete in top-k; ``new`` ones (just grown, not
yet trained) and ``masked`` ones (a corpus forgotten on request) do not. Exclusion is done on the
sub-keys (see :meth:`ExpertGrid.row_segments`): a segment's own rows and columns are closed. For the
newest segment those hold exactly its own cells; an older masked segment's rows and columns also hold
cells of *later* segments (an older row with a newer column), which the PEER layer searches as extra
regions so that they stay in reach (peer_model/peer.py ``_retrieval_regions``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

SEGMENT_STATUSES = ("active", "new", "masked")


@dataclass(frozen=True)
class Segment:
    """Experts ``start <= id < end`` were added together; the grid is ``rows × cols`` after them."""

    start: int
    end: int
    rows: int
    cols: int
    tag: str = ""  # why they were added, e.g. the corpus they were grown for
    status: str = "active"  # one of SEGMENT_STATUSES: whether retrieval may select these experts

    def __post_init__(self) -> None:
        if self.status not in SEGMENT_STATUSES:
            raise ValueError(f"segment status must be one of {', '.join(SEGMENT_STATUSES)}, got {self.status!r}")

    @property
    def size(self) -> int:
        return self.end - self.start


class ExpertGrid:
    """Maps grid cells (i, j) to stable expert ids and back, across growth segments."""

    def __init__(self, segments: list[Segment]):
        if not segments:
            raise ValueError("an expert grid needs at least one segment")
        self.segments: list[Segment] = []
        self._tables_by_device: dict[torch.device, dict[str, torch.Tensor]] = {}  # cleared on growth
        for seg in segments:
            self._append(seg)

    @classmethod
    def square(cls, side: int, tag: str = "initial") -> "ExpertGrid":
        return cls([Segment(0, side * side, side, side, tag)])

    @property
    def rows(self) -> int:
        return self.segments[-1].rows

    @property
    def cols(self) -> int:
        return self.segments[-1].cols

    @property
    def num_experts(self) -> int:
        return self.segments[-1].end

    def _append(self, seg: Segment) -> None:
        prev_rows, prev_cols, prev_end = (0, 0, 0)
        if self.segments:
            last = self.segments[-1]
            prev_rows, prev_cols, prev_end = last.rows, last.cols, last.end
        if seg.rows < prev_rows or seg.cols < prev_cols:
            raise ValueError("a grid can only grow")
        if seg.start != prev_end or seg.size != seg.rows * seg.cols - prev_rows * prev_cols:
            raise ValueError(f"segment {seg} does not follow the grid {prev_rows}x{prev_cols}")
        if seg.size <= 0:
            raise ValueError("a segment must add at least one expert")
        self.segments.append(seg)
        self._tables_by_device.clear()

    def plan_growth(self, num_experts: int) -> tuple[int, int]:
        """Smallest near-square grid holding at least ``num_experts`` more experts."""
        if num_experts <= 0:
            raise ValueError("num_experts must be positive")
        target = self.num_experts + num_experts
        rows = max(self.rows, math.isqrt(target - 1) + 1)
        cols = max(self.cols, -(-target // rows))
        return rows, cols

    def grow(self, rows: int, cols: int, tag: str = "", status: str = "active") -> Segment:
        """Extend the grid to ``rows × cols``; returns the new segment (ids after every old one)."""
        seg = Segment(self.num_experts, rows * cols - self.rows * self.cols + self.num_experts, rows, cols, tag,
                      status)
        self._append(seg)
        return seg

    def set_status(self, index: int, status: str) -> Segment:
        """Change segment ``index``'s retrieval status; returns the updated record."""
        if index == 0 and status != "active":
            raise ValueError("the initial segment cannot be excluded from retrieval")
        self.segments[index] = replace(self.segments[index], status=status)
        return self.segments[index]

    def row_segments(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For every first-half sub-key (row) and every second-half one (column), the index of the
        segment that added it: (rows,) and (cols,), int64."""
        t = self._tables(device)
        return t["row_segment"], t["col_segment"]

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-segment bounds as tensors on ``device`` (built once per device and growth, since every
        forward pass looks ids up): row/col extent, the previous extent and the first id."""
        if device not in self._tables_by_device:
            self._tables_by_device[device] = self._build_tables(device)
        return self._tables_by_device[device]

    def _build_tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        rows = [s.rows for s in self.segments]
        cols = [s.cols for s in self.segments]
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return {
            "rows": as_tensor(rows),
            "cols": as_tensor(cols),
            "prev_rows": as_tensor([0] + rows[:-1]),
            "prev_cols": as_tensor([0] + cols[:-1]),
            "start": as_tensor([s.start for s in self.segments]),
            "end": as_tensor([s.end for s in self.segments]),
            # a sub-key belongs to the first segment whose extent includes it
            "row_segment": torch.searchsorted(as_tensor(rows), torch.arange(self.rows, device=device), right=True),
            "col_segment": torch.searchsorted(as_tensor(cols), torch.arange(self.cols, device=device), right=True),
        }

    def cell_to_id(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Expert id of grid cell (i, j); any shape, int64."""
        t = self._tables(i.device)
        # a cell belongs to the first segment whose grid contains both its row and its column
        seg = torch.maximum(
            torch.searchsorted(t["rows"], i.contiguous(), right=True),
            torch.searchsorted(t["cols"], j.contiguous(), right=True),
        )
        prev_rows, prev_cols, cols = t["prev_rows"][seg], t["prev_cols"][seg], t["cols"][seg]
        new_cols = cols - prev_cols
        in_new_columns = i < prev_rows  # then j >= prev_cols: the right arm of the L
        local = torch.where(
            in_new_columns,
            i * new_cols + (j - prev_cols),
            prev_rows * new_cols + (i - prev_rows) * cols + j,
        )
        return t["start"][seg] + local

    def id_to_cell(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`cell_to_id`."""
        t = self._tables(ids.device)
        seg = torch.searchsorted(t["end"], ids, right=True)
        prev_rows, prev_cols, cols = t["prev_rows"][seg], t["prev_cols"][seg], t["cols"][seg]
        local = ids - t["start"][seg]
        new_cols = cols - prev_cols
        arm = prev_rows * new_cols  # size of the right arm of the L
        in_new_columns = local < arm
        safe_new_cols = new_cols.clamp(min=1)
        rest = local - arm
        i = torch.where(in_new_columns, local // safe_new_cols, prev_rows + rest // cols)
        j = torch.where(in_new_columns, prev_cols + local % safe_new_cols, rest % cols)
        return i, j

    def segment_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the segment each id belongs to."""
        return torch.searchsorted(self._tables(ids.device)["end"], ids, right=True)

    def to_list(self) -> list[dict]:
        return [asdict(s) for s in self.segments]

    @classmethod
    def from_list(cls, data: list[dict]) -> "ExpertGrid":
        return cls([Segment(**d) for d in data])
