"""What the train and forget jobs share around their own steps: :func:`run_owned_job` claims the job and records
how it ended (cancelled, failed with the reason, handed back at the worker's shutdown); :func:`claim_base` claims
the version a job starts from; :func:`token_data` reads corpora as the model's tokens; :func:`evaluate_child_and_parent`
gives both versions' bits per byte with progress and ETA."""
from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from peer_model.continual import evaluate_all
from peer_model.tokenizer import Tokenizer
from peer_model.train import TokenData

from ..context import ServiceContext
from ..db.models import Job
from ..db.session import transaction
from ..errors import Conflict, InvalidInput
from ..store.retention import retain_after_publish
from ..store.versions import active_version_id, live_version
from .lease import Dispatch, JobCancelled, LeaseLost, claim_job, dispatch_job, finish_job, hand_back_job, owned_job
from .progress import Attempt, JobProgress, WorkerStopping

log = logging.getLogger(__name__)


def run_owned_job(ctx: ServiceContext, job_id: int, body: Callable[[ServiceContext, int, Attempt], None],
                  dispatch: Dispatch | None = None) -> None:
    """Claim the job and run ``body(ctx, job_id, attempt)``, heartbeating all along (:class:`Attempt`); its end
    (cancelled, failed with the reason) is recorded on the job unless the lease was lost to another attempt.
    Interrupted by the worker's shutdown (``ctx.stopping``), the job is handed back and sent again through
    ``dispatch`` (without one, the watchdog sends it)."""
    settings = ctx.settings
    lease = claim_job(ctx.sessions, job_id, settings.job_max_attempts, settings.job_stale_seconds)
    if lease is None:
        return
    try:
        with Attempt(ctx, job_id, lease) as attempt:
            body(ctx, job_id, attempt)
    except LeaseLost:
        log.warning("job %s: lost its lease; another attempt owns it", job_id)
    except JobCancelled:
        finish_quietly(ctx, job_id, lease, "cancelled")
    except WorkerStopping:
        log.warning("job %s: handed back, the worker is shutting down", job_id)
        try:
            hand_back_job(ctx.sessions, job_id, lease)
        except LeaseLost:
            return
        if dispatch is not None:
            with ctx.sessions() as session:
                job = session.get(Job, job_id)
            if job.state == "queued":
                dispatch_job(ctx.sessions, dispatch, job)
    except (InvalidInput, Conflict) as exc:
        finish_quietly(ctx, job_id, lease, "failed", exc.message)
    except Exception as exc:  # noqa: BLE001 - recorded on the job
        log.exception("job %s failed", job_id)
        finish_quietly(ctx, job_id, lease, "failed", f"{type(exc).__name__}: {exc}")
    else:
        retain_after_publish(ctx)


def finish_quietly(ctx: ServiceContext, job_id: int, lease: str, state: str, error: str | None = None) -> None:
    try:
        finish_job(ctx.sessions, job_id, lease, state, error)
    except LeaseLost:
        pass


def token_data(ctx: ServiceContext, corpus_ids: list[int], part: str, tokenizer: Tokenizer) -> TokenData:
    """The corpora's text in the ids of the model that trains or is evaluated on it (``tokenizer``: its own);
    evaluation still reports bits per byte, so versions with different tokenizers compare."""
    return TokenData.from_text("".join(ctx.store.read_corpus(c, part) for c in corpus_ids), tokenizer)


def claim_base(ctx: ServiceContext, job_id: int, lease: str, use: str) -> tuple[int, bool]:
    """The version this attempt starts from, recorded on the job at once (retention keeps a running job's
    base): the pinned ``base_version_id``, or for an unpinned job the version active now. Returns it and
    whether it follows the active version (a retried attempt then takes the version active at its own start:
    ``metrics.base_follows_active``). ``use`` names the use in the error for a deleted version."""
    with transaction(ctx.sessions) as session:
        job = owned_job(session, job_id, lease)
        follows = job.base_version_id is None or bool(job.metrics.get("base_follows_active"))
        base_id = active_version_id(session) if follows else job.base_version_id
        if base_id is None:
            raise InvalidInput(f"no version to be {use}: activate one first")
        live_version(session, base_id, use)  # locked against a concurrent deletion until this commits
        job.base_version_id = base_id
        job.metrics = {**job.metrics, "base_follows_active": follows}
        return base_id, follows


def corpus_available(ctx: ServiceContext, corpus_id: int, part: str) -> bool:
    """The corpus' text is in the store (a deleted corpus' is not)."""
    return ctx.store.has_corpus(corpus_id, part)


def evaluate_child_and_parent(ctx: ServiceContext, child: nn.Module, parent: nn.Module, val_sets: dict[int, TokenData],
                              seq_len: int, progress: JobProgress, also: int = 0) -> tuple[dict[int, float], dict[int, float]]:
    """Bits per byte of the child and of the parent on every validation set (``PEER_EVAL_MAX_BATCHES`` batches of
    ``PEER_TRAIN_BATCH_SIZE`` windows each); the job's progress and ETA follow the batches, and ``also`` units
    of work that follow in the same phase (probe items: jobs/probes.py)."""
    settings = ctx.settings
    batch, most, chunk = settings.train_batch_size, settings.eval_max_batches, settings.train_loss_chunk_tokens
    progress.evaluating(2 * sum(data.eval_batch_count(batch, seq_len, most) for data in val_sets.values()) + also)
    return tuple(evaluate_all(model, val_sets, seq_len, batch, most, chunk, progress.on_eval_batch)
                 for model in (child, parent))
