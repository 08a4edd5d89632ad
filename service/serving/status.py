"""What an operator (or a client) should know about the served model right now.

A fresh byte-level model (version 1 before its bootstrap job has published version 2) answers with
noise; a response from such a version carries a warning saying so, with the progress of the job that
will train it ("the model is untrained: bootstrap job 2 is at 37%"). A version counts as trained once it
has learnt a corpus, or when it descends from a pretrained model (PEER_BASE_MODEL).
"""
from __future__ import annotations

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from peer_model.hf.bases import PACKAGED_BASES

from ..db.models import FINAL_JOB_STATES, Corpus, Job, PoolVersion
from ..store.versions import active_version_id, is_pretrained


def is_trained(version: PoolVersion) -> bool:
    return bool(version.corpus_ids) or is_pretrained(version)


def training_job(session: Session) -> Job | None:
    """The unfinished ingest or training job that will produce a trained version: a running training job
    first, then the oldest unfinished one."""
    running_train_first = case(((Job.kind == "train") & (Job.state == "running"), 0), else_=1)
    return session.scalars(select(Job).where(Job.kind.in_(("ingest", "train")), Job.state.not_in(FINAL_JOB_STATES))
                           .order_by(running_train_first, Job.id).limit(1)).first()


def untrained_warning(session: Session, version_id: int | None) -> str | None:
    """None when ``version_id`` is trained (or unknown); otherwise one ASCII line (it travels in an HTTP
    header) naming the job that will train the model and how far it is."""
    version = session.get(PoolVersion, version_id) if version_id is not None else None
    if version is None or is_trained(version):
        return None
    job = training_job(session)
    if job is None:
        others = session.scalar(select(func.count(PoolVersion.id)).where(PoolVersion.id != version.id))
        remedy = ("activate a trained version (POST /v1/versions/{id}/activate) or upload a corpus" if others
                  else "upload a corpus: POST /v1/corpora")
        return (f"the model is untrained: version {version.id} has learnt no corpus and no training job is "
                f"queued ({remedy})")
    builtin = session.scalar(select(func.count(Corpus.id)).where(Corpus.id.in_(job.corpus_ids),
                                                                Corpus.source == "builtin"))
    label = "bootstrap job" if builtin else {"ingest": "ingest job", "train": "training job"}[job.kind]
    if job.kind == "ingest":
        doing = "is queued" if job.state == "queued" else "is ingesting its corpus"
        return f"the model is untrained: {label} {job.id} {doing}; training follows"
    if job.state == "queued":
        return f"the model is untrained: {label} {job.id} is queued"
    return f"the model is untrained: {label} {job.id} is at {int(job.progress * 100)}%"


def base_of(version: PoolVersion) -> dict:
    """The base model a version descends from: ``name`` (a packaged base's title, or the PEER_BASE_MODEL it
    was loaded from), ``family`` (its model_type) and ``pretrained``; a fresh model is byte-level."""
    hf = version.model_config_json.get("hf_config")
    if hf is None:
        return {"name": "fresh byte-level model", "family": "peer", "pretrained": False}
    source = hf.get("_name_or_path")
    packaged = PACKAGED_BASES.get(source)
    return {"name": packaged.title if packaged else source or hf.get("model_type"), "family": hf.get("model_type"),
            "pretrained": True}


def service_status(session: Session, served_version_id: int | None, api_keys_required: bool) -> dict:
    """GET /v1/status: the active and the served version, the base model served, the warning, unfinished
    jobs, whether mutating requests need a key."""
    active_id = active_version_id(session)
    counts = dict(session.execute(select(Job.state, func.count(Job.id))
                                  .where(Job.state.not_in(FINAL_JOB_STATES)).group_by(Job.state)).all())
    served = session.get(PoolVersion, served_version_id) if served_version_id is not None else None
    return {"active_version": active_id, "served_version": served_version_id,
            "base": base_of(served) if served is not None else None,
            "warning": untrained_warning(session, active_id), "api_keys_required": api_keys_required,
            "jobs": {state: int(counts.get(state, 0)) for state in ("queued", "running", "cancelling")}}
