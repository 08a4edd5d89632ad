"""Expert utilization observed while serving, per version and PEER layer (stored by the engine, read from the
roll-ups of service/serving/usage.py)."""
from __future__ import annotations

import torch
from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from peer_model.pool import ExpertGrid, Segment
from peer_model.usage import grid_heatmap, segment_usage, usage_stats

from ...db.models import PoolVersion
from ...errors import InvalidInput, NotFound
from ...serving.engine import decode_usage
from ...serving.usage import usage_buckets, usage_total
from ...store.versions import active_version_id, get_version
from ..deps import get_ctx, get_session
from ..schemas import IdQuery
from ..security import require_scope

router = APIRouter(tags=["experts"])


def _version(session: Session, version_id: int | None) -> PoolVersion:
    version_id = active_version_id(session) if version_id is None else version_id
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
    """Summed counters over every stored window: (counts, tokens, windows), from the roll-up
    (service/serving/usage.py)."""
    usage = usage_total(session, version.id, int(layer))
    return decode_usage(usage.counts, version.experts[layer]), usage.tokens, usage.windows


MAX_CELLS = 512 * 512  # the largest grid whose every cell ``cells=true`` returns


def layer_utilization(session: Session, version: PoolVersion, layer: str, top: int = 10, bins: int = 16,
                      cells: bool = False) -> dict:
    """One PEER layer's usage over all traffic ``version`` served: stats, segments, the binned heat map and
    the grid's shape; with ``cells`` the rows × cols map of every expert's selections."""
    counts, tokens, windows = _counts(session, version, layer)
    grid = _grid(version, layer)
    segments = segment_usage(counts, grid.segments)
    for row, described in zip(segments, version.segments[layer]):
        row.update(rows=described["rows"], cols=described["cols"], status=described.get("status", "active"),
                   corpus_ids=described["corpus_ids"])
    view = {"tokens": tokens, "windows": windows, "rows": grid.rows, "cols": grid.cols,
            **usage_stats(counts, top).to_dict(), "segments": segments,
            "heatmap": grid_heatmap(counts, grid, bins).tolist()}
    if cells:
        if grid.rows * grid.cols > MAX_CELLS:
            raise InvalidInput(f"layer {layer} has {grid.rows} x {grid.cols} cells, over {MAX_CELLS}: "
                               f"ask for the binned heat map (bins) instead")
        i, j = grid.id_to_cell(torch.arange(grid.num_experts))
        grid_counts = torch.zeros(grid.rows, grid.cols, dtype=torch.long)
        grid_counts[i, j] = counts
        view["cells"] = grid_counts.tolist()
    return view


@router.get("/v1/experts/utilization", dependencies=[Depends(require_scope("read"))])
def utilization(version: IdQuery = None, layer: int | None = None, top: int = Query(10, ge=1, le=1000),
                bins: int = Query(16, ge=1, le=256), cells: bool = False, session: Session = Depends(get_session)):
    """Per PEER layer: fraction of experts used, KL from uniform usage (the paper's unevenness), entropy,
    hottest experts, usage per segment (with the corpora each was grown for and the grid's rows × cols
    after it) and a bins × bins heat map of the product-key grid (``rows`` × ``cols`` sub-key pairs), over
    all traffic this version served (default: the active version). ``cells=true`` adds ``cells``: the
    rows × cols selections of every expert (row = first sub-key half; grids up to 512² cells)."""
    pool_version = _version(session, version)
    layers = {key: layer_utilization(session, pool_version, key, top, bins, cells)
              for key in _layers(pool_version, layer)}
    return {"version": pool_version.id, "layers": layers}


def utilization_history(session: Session, version: PoolVersion, layer: str, bucket_seconds: int,
                        points: int = 50) -> list[dict]:
    """Usage fraction and KL from uniform of all traffic served up to the end of each of at most ``points``
    time buckets (PEER_USAGE_BUCKET_SECONDS; spread evenly over the buckets that saw traffic), oldest first;
    ``at`` is the end of the bucket's last window."""
    buckets = usage_buckets(session, version.id, int(layer), bucket_seconds)
    shown = min(points, len(buckets))
    marks = {round(k * (len(buckets) - 1) / max(1, shown - 1)) for k in range(shown)}
    counts = torch.zeros(version.experts[layer], dtype=torch.long)
    tokens, history = 0, []
    for index, bucket in enumerate(buckets):
        counts += decode_usage(bucket.counts, counts.numel())
        tokens += bucket.tokens
        if index in marks:
            stats = usage_stats(counts, 1)
            history.append({"at": bucket.last_end.isoformat(), "tokens": tokens,
                            "usage_fraction": stats.usage_fraction, "kl_from_uniform": stats.kl_from_uniform})
    return history


@router.get("/v1/experts/utilization/history", dependencies=[Depends(require_scope("read"))])
def utilization_over_time(version: IdQuery = None, layer: int | None = None,
                          points: int = Query(50, ge=1, le=1000), ctx=Depends(get_ctx),
                          session: Session = Depends(get_session)):
    """Per PEER layer: how usage fraction and KL from uniform evolved over the traffic a version served
    (cumulative, at the ends of at most ``points`` time buckets of PEER_USAGE_BUCKET_SECONDS; empty before
    any traffic)."""
    pool_version = _version(session, version)
    return {"version": pool_version.id,
            "layers": {key: utilization_history(session, pool_version, key, ctx.settings.usage_bucket_seconds,
                                                points) for key in _layers(pool_version, layer)}}


@router.get("/v1/experts/{layer}/{expert_id}", dependencies=[Depends(require_scope("read"))])
def expert(layer: int, expert_id: int, version: IdQuery = None, session: Session = Depends(get_session)):
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
