"""First start with an empty database: version 1 (a fresh model) and a training job on a small real corpus,
so a newcomer sees the whole loop: ingest → train → evaluate → publish → hot swap. With PEER_BASE_MODEL,
version 1 is the retrofitted pretrained model and serves as it is."""
from __future__ import annotations

import logging

from peer_model.corpora import CorpusUnavailable, load_corpus

from ..context import ServiceContext
from ..store.lock import store_write
from ..store.versions import ensure_initial_version
from .ingest import parse_upload
from .lease import Dispatch, dispatch_job
from .uploads import accept_corpus

log = logging.getLogger(__name__)


def bootstrap(ctx: ServiceContext, dispatch: Dispatch) -> int | None:
    """Create version 1 if there is no version; then, if PEER_BOOTSTRAP_CORPUS names a packaged corpus,
    upload it with a training job. Returns that job's id (None when nothing was started). A pretrained base
    (PEER_BASE_MODEL) speaks the language already: no bootstrap training."""
    settings = ctx.settings
    created = ensure_initial_version(ctx)
    if created is None and settings.base_model is not None:
        log.warning("PEER_BASE_MODEL=%s is not used: versions exist already (it only makes version 1)",
                    settings.base_model)
    if created is None or not settings.bootstrap_corpus or settings.base_model is not None:
        return None
    name = settings.bootstrap_corpus
    try:
        text = load_corpus(name, settings.resolved_corpora_cache_dir, settings.bootstrap_max_bytes)
    except (CorpusUnavailable, KeyError) as exc:
        log.warning("bootstrap corpus %r unavailable, version 1 stays untrained: %s", name, exc)
        return None
    data = text.encode("utf-8")
    with ctx.sessions() as session, store_write(ctx, session):  # from the text's write to its row (store/lock.py)
        _, job = accept_corpus(ctx, session, name, parse_upload(data, "text", len(data)), text, "text", True,
                               {"steps": settings.bootstrap_steps}, source="builtin")
        session.commit()
    dispatch_job(ctx.sessions, dispatch, job)
    log.info("bootstrap: training version 2 on %r (ingest job %s)", name, job.id)
    return job.id
