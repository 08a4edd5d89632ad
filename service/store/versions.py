"""Pool versions: the active one, activation (and rollback), describing a model's pools, version 1."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from peer_model.hf import load_hf, read_hf_config, retrofit
from peer_model.hf.families import config_fields
from peer_model.model import PEERTransformer

from ..db.models import Activation, PoolVersion
from ..db.session import transaction
from ..errors import Conflict, NotFound
from ..settings import InvalidSetting, Settings
from .lock import store_write
from .store import Store

if TYPE_CHECKING:  # the context holds the store: store/ names it in annotations only
    from ..context import ServiceContext

INITIAL_CHECKPOINT = Store.version_key("initial")
ACTIVATION_LOCK = 0x5045455241  # any constant shared by every process of the service ("PEERA")
ACTIVATION_CHANNEL = "peer_activation"  # PostgreSQL NOTIFY channel of activations


def active_version_id(session: Session) -> int | None:
    return session.scalar(select(Activation.version_id).order_by(Activation.id.desc()).limit(1))


def get_version(session: Session, version_id: int) -> PoolVersion:
    version = session.get(PoolVersion, version_id)
    if version is None:
        raise NotFound(f"version {version_id} not found")
    return version


def live_version(session: Session, version_id: int, purpose: str, lock: bool = True) -> PoolVersion:
    """The version, 409 when it was deleted (it can no longer be ``purpose``: activated, trained from, ...).
    With ``lock`` its row stays locked against a concurrent deletion until the transaction ends (a no-op
    UPDATE: a row lock on PostgreSQL, the write lock on SQLite)."""
    version = get_version(session, version_id)
    if lock:
        live = session.execute(update(PoolVersion).where(PoolVersion.id == version_id, PoolVersion.deleted_at.is_(None))
                               .values(pinned=PoolVersion.pinned)).rowcount
    else:
        live = version.deleted_at is None
    if not live:
        raise Conflict(f"version {version_id} was deleted: it can no longer be {purpose}")
    return version


def is_pretrained(version: PoolVersion) -> bool:
    """A descendant of a pretrained model (PEER_BASE_MODEL): it knows text that no corpus of ours holds."""
    return version.model_config_json.get("hf_config") is not None


def lock_activations(session: Session) -> None:
    """Serialise activations until this transaction ends, so that reading the active version and
    activating another cannot interleave with a concurrent activation (PostgreSQL: a transaction-level
    advisory lock; SQLite allows one writer at a time anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ACTIVATION_LOCK})


def activate(session: Session, version_id: int, reason: str, actor: str) -> Activation:
    """Record ``version_id`` as the active version. On PostgreSQL every API replica that listens on
    ACTIVATION_CHANNEL hears of it when the transaction commits (NOTIFY is transactional) and swaps at once;
    the others see it at their next poll."""
    live_version(session, version_id, "activated")
    activation = Activation(version_id=version_id, reason=reason, actor=actor)
    session.add(activation)
    session.flush()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, :payload)"),
                        {"channel": ACTIVATION_CHANNEL, "payload": str(version_id)})
    return activation


def describe_pools(model: PEERTransformer, parent_segments: dict | None, new_corpus_ids: list[int]) -> tuple[dict, dict]:
    """``({layer: experts}, {layer: [segment + corpus_ids]})``: segments inherited from the parent keep
    their corpora; segments the parent did not have were grown for ``new_corpus_ids``."""
    experts, segments = {}, {}
    for layer_index, layer in model.peer_layers().items():
        key = str(layer_index)
        inherited = (parent_segments or {}).get(key, [])
        rows = []
        for position, segment in enumerate(layer.grid.segments):
            corpus_ids = inherited[position]["corpus_ids"] if position < len(inherited) else list(new_corpus_ids)
            rows.append({"start": segment.start, "end": segment.end, "rows": segment.rows, "cols": segment.cols,
                         "tag": segment.tag, "corpus_ids": corpus_ids, "status": segment.status})
        experts[key] = layer.num_experts
        segments[key] = rows
    return experts, segments


def base_model(settings: Settings) -> PEERTransformer:
    """PEER_BASE_MODEL with PEER layers of the configured pool shape retrofitted into PEER_BASE_LAYERS; with the
    parallel branch it computes what the pretrained model does. Any problem names the setting."""
    path, peer = settings.base_model, settings.peer_config()
    try:
        own = config_fields(read_hf_config(path))["max_seq_len"]  # the model's own context (capped by the loader)
        base = load_hf(path, max_seq_len=min(settings.base_max_seq_len, own))
    except (ValueError, OSError) as exc:  # UnsupportedModel is a ValueError
        raise InvalidSetting(f"PEER_BASE_MODEL={path}: {exc}") from None
    try:
        return retrofit(base, peer, settings.base_layers, settings.base_branch, settings.base_trains)
    except ValueError as exc:
        raise InvalidSetting(f"PEER_BASE_LAYERS={settings.base_layers}: {exc}") from None


def ensure_initial_version(ctx: ServiceContext) -> int | None:
    """With no version at all, write the first version and activate it: a fresh model of the configured
    shape, or with PEER_BASE_MODEL the retrofitted pretrained model (its tokenizer goes along in the
    checkpoint); returns its id (None if a version already existed). Safe to race: the checkpoint path is
    unique, so only one of two concurrent callers inserts."""
    settings = ctx.settings
    with ctx.sessions() as session:
        if session.scalar(select(PoolVersion.id).limit(1)) is not None:
            return None
    if settings.base_model is not None:
        model = base_model(settings)
        gate_reason = (f"pretrained model {settings.base_model} with PEER layers in blocks {model.config.peer_layers} "
                       f"({settings.base_branch} branch)")
        reason = f"first start: pretrained {Path(settings.base_model).name} with PEER layers retrofitted"[:200]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = PEERTransformer(settings.fresh_model_config())
        gate_reason, reason = "fresh model", "first start: fresh model of the configured shape"
    experts, segments = describe_pools(model, None, [])
    with store_write(ctx):  # from the checkpoint to its row (store/lock.py)
        if not ctx.store.has(INITIAL_CHECKPOINT):
            ctx.store.save_model(INITIAL_CHECKPOINT, model, extra={"version": "initial"})
        try:
            with transaction(ctx.sessions) as session:
                version = PoolVersion(checkpoint=INITIAL_CHECKPOINT, model_config_json=model.config.to_dict(),
                                      experts=experts, segments=segments, corpus_ids=[], strategy=None,
                                      gate_passed=None, gate_reason=gate_reason)
                session.add(version)
                session.flush()
                activate(session, version.id, reason, "bootstrap")
                return version.id
        except IntegrityError:
            return None
