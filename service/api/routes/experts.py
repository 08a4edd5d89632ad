"""Expert utilization observed while serving, per version and PEER layer (stored by the engine)."""
from __future__ import annotations

import torch
from fastapi import APIRouter, Depends, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from peer_model.pool import ExpertGrid, Segment
from peer_model.usage import grid_heatmap, segment_usage, usage_stats

from ...db.models import ExpertUsage, PoolVersion
from ...engine import decode_usage
from ...errors import InvalidInput, NotFound
from ...versions import active_version_id, get_version
from ..deps import get_session

router = APIRouter(tags=["experts"])


def _version(session: Session, version_id: int | None) -> PoolVersion:
    version_id = version_id or active_version_id(session)
    if version_id is None:
        raise NotFound("no active version")
    return get_version(session, version_id)


def _layers(version: PoolVersion, layer: int | None) -> list[str]:
    if layer is None:
        return sorted(version.experts, key=int)
    if str(layer) not in version.experts:
        raise NotFound(f"layer {layer} is not a PEER layer of version {version.id}; "
                       f"PEER layers: {sorted(map(int, version.experts))}")
    return [str(layer)]


def _grid(version: PoolVersion, layer: str) -> ExpertGrid:
    return ExpertGrid.from_list([{k: s[k] for k in ("start", "end", "rows", "cols", "tag")}
                                 for s in version.segments[layer]])


def _counts(session: Session, version: PoolVersion, layer: str) -> tuple[torch.Tensor, int, int]:
    """Summed counters over every stored window: (counts, tokens, windows)."""
    counts = torch.zeros(version.experts[layer], dtype=torch.long)
    tokens = windows = 0
    for row in session.scalars(select(ExpertUsage).where(ExpertUsage.version_id == version.id,
                                                         ExpertUsage.layer == int(layer))):
        counts += decode_usage(row.counts, counts.numel())
        tokens += row.tokens
        windows += 1
    return counts, tokens, windows


@router.get("/v1/experts/utilization")
def utilization(version: int | None = None, layer: int | None = None, top: int = Query(10, ge=1, le=1000),
                bins: int = Query(16, ge=1, le=256), session: Session = Depends(get_session)):
    """Per PEER layer: fraction of experts used, KL from uniform usage (the paper's unevenness), entropy,
    hottest experts, usage per segment (with the corpora each was grown for) and a bins × bins heat map of
    the product-key grid, over all traffic this version served (default: the active version)."""
    pool_version = _version(session, version)
    layers = {}
    for key in _layers(pool_version, layer):
        counts, tokens, windows = _counts(session, pool_version, key)
        grid = _grid(pool_version, key)
        segments = segment_usage(counts, grid.segments)
        for row, described in zip(segments, pool_version.segments[key]):
            row["corpus_ids"] = described["corpus_ids"]
        layers[key] = {"tokens": tokens, "windows": windows, **usage_stats(counts, top).to_dict(),
                       "segments": segments, "heatmap": grid_heatmap(counts, grid, bins).tolist()}
    return {"version": pool_version.id, "layers": layers}


@router.get("/v1/experts/{layer}/{expert_id}")
def expert(layer: int, expert_id: int, version: int | None = None, session: Session = Depends(get_session)):
    """One expert: its segment (and the corpora it was grown for), its product-key cell and its usage."""
    pool_version = _version(session, version)
    key = _layers(pool_version, layer)[0]
    grid = _grid(pool_version, key)
    if not 0 <= expert_id < grid.num_experts:
        raise InvalidInput(f"expert id must be in [0, {grid.num_experts}) for layer {layer}")
    row, col = (int(t) for t in grid.id_to_cell(torch.tensor([expert_id])))
    segment_index = int(grid.segment_of(torch.tensor([expert_id])))
    segment: Segment = grid.segments[segment_index]
    counts, tokens, _ = _counts(session, pool_version, key)
    selections = int(counts[expert_id])
    total = int(counts.sum())
    return {"version": pool_version.id, "layer": layer, "expert_id": expert_id, "sub_key_row": row,
            "sub_key_col": col, "segment": {"index": segment_index, "start": segment.start, "end": segment.end,
                                            "tag": segment.tag,
                                            "corpus_ids": pool_version.segments[key][segment_index]["corpus_ids"]},
            "selections": selections, "selection_share": selections / total if total else 0.0,
            "rank": int((counts > selections).sum()) + 1 if selections else None, "tokens_observed": tokens}
