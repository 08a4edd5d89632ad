"""The console's pages: each answers one question an operator asks.

- /ui/versions: what is served, where did each version come from, can I roll back? (``version_view``, as
  GET /v1/versions/{id}, and the jobs that made them)
- /ui/evaluation: what did each version learn and forget? (evaluations and the job's parent bpb, as GET
  /v1/versions and /v1/jobs/{id})
- /ui/jobs: what is training, how fast, when does it end? (GET /v1/jobs, polled every second by console.js)
- /ui/experts: which experts does the traffic use? (``layer_utilization`` and ``utilization_history``, as GET
  /v1/experts/utilization[/history]; the heat map is drawn from ``cells=true``)
- /ui/corpora: did my upload ingest, and what came of it? (corpora, their jobs, ``stream_view``)
- /ui/playground: what does the model say now, and which version says it? (POST /v1/generate, stream=true)

Pages are rendered here from the same functions as the JSON routes, so they show their data without
JavaScript; ``static/console.js`` adds what changes while one looks (jobs, uploads, streamed text, the
untrained-model banner from GET /v1/status) and the actions (activate, cancel, upload), which go to the
JSON API as the signed-in session (access.py) and show the API's message on failure. Viewing is open like
the API's GET endpoints.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from urllib.parse import quote

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..api.deps import get_session
from ..api.security import request_key
from ..api.routes.experts import _grid, _layers, _version, layer_utilization, utilization_history
from ..api.routes.streams import stream_view
from ..api.routes.versions import version_view
from ..api.schemas import IdQuery
from ..db.models import Corpus, Job, PoolVersion, Stream
from ..serving.status import service_status
from ..store.versions import active_version_id, get_version
from . import access
from .access import console_reader
from .rendering import HERE, templates

# in the OpenAPI schema (tag "console", HTML answers) so that the fuzzing of tests/service/test_fuzz.py reaches them
router = APIRouter(prefix="/ui", tags=["console"], default_response_class=HTMLResponse,
                   dependencies=[Depends(console_reader)])
FULL_GRID_CELLS = 256 * 256  # up to this many experts the heat map has one cell per expert, else binned
HEATMAP_BINS = 128


def mount(app) -> None:
    app.include_router(access.router)
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")


def render(request: Request, session: Session, name: str, title: str, **context):
    state = request.app.state
    settings = state.ctx.settings
    status = service_status(session, state.host.version_id, bool(settings.api_keys))
    return templates.TemplateResponse(request, f"{name}.html", {
        "page": name, "title": title, "status": status, "acting_as": request_key(request, settings, required=False),
        "next": quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""), safe=""),
        **context})


def script_json(value) -> str:
    """JSON to put inside a <script type="application/json"> element (no "</script>" can close it early)."""
    return json.dumps(value).replace("<", "\\u003c")


def corpus_names(session: Session) -> dict[int, str]:
    return dict(session.execute(select(Corpus.id, Corpus.name)).all())


@router.get("", include_in_schema=False)
@router.get("/")
def index():
    return RedirectResponse("/ui/versions", status_code=307)


# ---- versions ----------------------------------------------------------------------------------------


@router.get("/versions")
def versions_page(request: Request, session: Session = Depends(get_session)):
    active_id = active_version_id(session)
    versions = session.scalars(select(PoolVersion).order_by(PoolVersion.id.desc()).limit(500)).all()[::-1]
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_([v.job_id for v in versions if v.job_id])))}
    known = {v.id for v in versions}
    views, children, roots = {}, defaultdict(list), []
    for version in versions:
        view = version_view(session, version, active_id, detail=True)
        parent = session.get(PoolVersion, version.parent_id) if version.parent_id else None
        parent_corpora = set(parent.corpus_ids) if parent else set()
        view["learnt"] = [c for c in version.corpus_ids if c not in parent_corpora]
        view["dropped"] = [c for c in (parent.corpus_ids if parent else []) if c not in version.corpus_ids]
        view["job"] = jobs.get(version.job_id)
        view["total_experts"] = sum(version.experts.values())
        views[version.id] = view
        if version.parent_id in known:
            children[version.parent_id].append(version.id)
        else:
            roots.append(version.id)
    return render(request, session, "versions", "Versions", views=views, children=children, roots=roots,
                  active_id=active_id, names=corpus_names(session))


# ---- evaluation --------------------------------------------------------------------------------------


def lineage(session: Session, version: PoolVersion) -> list[PoolVersion]:
    """The version and its ancestors, root first."""
    chain = [version]
    while chain[-1].parent_id is not None and len(chain) < 1000:
        chain.append(get_version(session, chain[-1].parent_id))
    return chain[::-1]


def change_colour(change: float | None) -> str:
    """Green for bits per byte that went down against the parent, red for up; stronger with the change."""
    if change is None or not math.isfinite(change):
        return ""
    alpha = round(0.08 + 0.62 * min(1.0, abs(change) / 0.25) ** 0.6, 3)
    hue = "142, 60%, 42%" if change < 0 else "0, 75%, 52%"
    return f"background: hsla({hue}, {alpha})"


@router.get("/evaluation")
def evaluation_page(request: Request, version: IdQuery = None, session: Session = Depends(get_session)):
    active_id = active_version_id(session)
    leaf_id = active_id if version is None else version
    all_versions = session.scalars(select(PoolVersion).order_by(PoolVersion.id.desc()).limit(500)).all()
    context = {"leaf_id": leaf_id, "active_id": active_id, "versions": all_versions, "names": corpus_names(session),
               "tolerance": request.app.state.ctx.settings.activation_tolerance, "rows": [], "columns": []}
    if leaf_id is None:
        return render(request, session, "evaluation", "Evaluation", **context)
    chain = lineage(session, get_version(session, leaf_id))
    views = [version_view(session, v, active_id) for v in chain]
    columns = sorted({int(c) for view in views for c in view["evaluation"]})
    rows, previous = [], {}
    for pool_version, view in zip(chain, views):
        evaluation = {int(c): bpb for c, bpb in view["evaluation"].items()}
        job = session.get(Job, pool_version.job_id) if pool_version.job_id else None
        parent_bpb = {int(c): bpb for c, bpb in ((job.metrics or {}).get("parent_bpb") or {}).items()} if job else {}
        parent_corpora = set(chain[chain.index(pool_version) - 1].corpus_ids) if pool_version.parent_id else set()
        cells = []
        for corpus_id in columns:
            bpb = evaluation.get(corpus_id)
            base = parent_bpb.get(corpus_id, previous.get(corpus_id))
            change = (bpb - base) / base if bpb is not None and base else None
            learnt = corpus_id not in parent_corpora and corpus_id in pool_version.corpus_ids
            cells.append({"corpus_id": corpus_id, "bpb": bpb, "parent": base, "change": change, "learnt": learnt,
                          "style": change_colour(change),
                          "forgot": change is not None and not learnt and change > context["tolerance"]})
        rows.append({"view": view, "cells": cells, "job": job})
        previous = evaluation
    context.update(rows=rows, columns=columns)
    return render(request, session, "evaluation", "Evaluation", **context)


# ---- jobs --------------------------------------------------------------------------------------------


@router.get("/jobs")
def jobs_page(request: Request, session: Session = Depends(get_session)):
    return render(request, session, "jobs", "Jobs", names_json=script_json(corpus_names(session)))


# ---- experts -----------------------------------------------------------------------------------------


def sparkline(values: list[float | None], width: int = 240, height: int = 48) -> str:
    """SVG polyline points for ``values`` (None skipped), scaled into width × height."""
    known = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(known) < 2:
        return ""
    low, high = min(v for _, v in known), max(v for _, v in known)
    span = (high - low) or 1.0
    step = width / max(1, len(values) - 1)
    return " ".join(f"{i * step:.1f},{height - 4 - (v - low) / span * (height - 8):.1f}" for i, v in known)


@router.get("/experts")
def experts_page(request: Request, version: IdQuery = None, layer: int | None = None,
                 session: Session = Depends(get_session)):
    pool_version = _version(session, version)
    names = corpus_names(session)
    versions = session.scalars(select(PoolVersion.id).order_by(PoolVersion.id.desc()).limit(500)).all()
    layer_keys = sorted(pool_version.experts, key=int)
    context = {"version": pool_version, "versions": versions, "layers": layer_keys, "names": names, "layer": None}
    if not layer_keys:
        return render(request, session, "experts", "Experts", **context)
    key = _layers(pool_version, layer)[0] if layer is not None else layer_keys[0]
    data = layer_utilization(session, pool_version, key, top=12, bins=1)
    data.pop("heatmap")
    grid = _grid(pool_version, key)
    total = max(1, data["total_selections"])
    hottest = []
    if data["hottest"]:
        ids = torch.tensor([expert_id for expert_id, _ in data["hottest"]])
        rows, cols = grid.id_to_cell(ids)
        segments = grid.segment_of(ids)
        for (expert_id, count), row, col, segment in zip(data["hottest"], rows.tolist(), cols.tolist(),
                                                         segments.tolist()):
            hottest.append({"id": expert_id, "count": count, "share": count / total, "row": row, "col": col,
                            "segment": segment})
    for segment in data["segments"]:
        segment["label"] = ", ".join(names.get(c, f"corpus {c}") for c in segment["corpus_ids"]) or (
            segment["tag"] or "initial experts")
    bucket_seconds = request.app.state.ctx.settings.usage_bucket_seconds
    history = utilization_history(session, pool_version, key, bucket_seconds, 60)
    full = grid.rows * grid.cols <= FULL_GRID_CELLS
    context.update(layer=key, data=data, hottest=hottest, history=history, full=full, bins=HEATMAP_BINS,
                   usage_line=sparkline([h["usage_fraction"] for h in history]),
                   kl_line=sparkline([h["kl_from_uniform"] for h in history]),
                   labels_json=script_json([s["label"] for s in data["segments"]]))
    return render(request, session, "experts", "Experts", **context)


# ---- corpora and streams -----------------------------------------------------------------------------


@router.get("/corpora")
def corpora_page(request: Request, session: Session = Depends(get_session)):
    corpora = session.scalars(select(Corpus).order_by(Corpus.id.desc()).limit(200)).all()
    ingest_jobs = session.scalars(select(Job).where(Job.kind == "ingest").order_by(Job.id.desc()).limit(1000)).all()
    ingest_by_corpus = {job.corpus_ids[0]: job for job in reversed(ingest_jobs) if job.corpus_ids}
    follow_ids = [job.next_job_id for job in ingest_by_corpus.values() if job.next_job_id]
    follow = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(follow_ids)))} if follow_ids else {}
    streams = [stream_view(session, s) for s in session.scalars(select(Stream).order_by(Stream.id)).all()]
    return render(request, session, "corpora", "Corpora and streams", corpora=corpora, ingest=ingest_by_corpus,
                  follow=follow, streams=streams, limit=request.app.state.ctx.settings.max_corpus_bytes)


# ---- playground --------------------------------------------------------------------------------------


@router.get("/playground")
def playground_page(request: Request, session: Session = Depends(get_session)):
    settings = request.app.state.ctx.settings
    return render(request, session, "playground", "Playground",
                  max_tokens=min(settings.default_max_tokens, settings.max_tokens_limit, 200),
                  max_tokens_limit=settings.max_tokens_limit)
