"""First start: version 1 is a fresh model of the configured shape, and the bootstrap corpus trains
version 2 through the normal job chain; a second start changes nothing."""
from __future__ import annotations

from sqlalchemy import func, select

from service.context import ServiceContext
from service.db.migrate import upgrade
from service.db.models import Corpus, Job, PoolVersion
from service.db.session import transaction
from service.jobs.bootstrap import bootstrap
from service.jobs.ingest import parse_upload, run_ingest_job
from service.jobs.train import run_train_job
from service.jobs.uploads import accept_corpus
from service.store.versions import active_version_id, ensure_initial_version

from .conftest import domain_text, tiny_settings


def test_first_start_creates_version_1_and_trains_version_2_on_the_bootstrap_corpus(pg_url, tmp_path):
    cache = tmp_path / "corpora"
    cache.mkdir()
    (cache / "shakespeare.txt").write_text(domain_text("english"), encoding="utf-8")  # the corpus cache file
    ctx = ServiceContext.from_settings(tiny_settings(tmp_path / "home", pg_url, bootstrap_corpus="shakespeare",
                                                     corpora_cache_dir=cache, bootstrap_steps=20))
    sent: list[Job] = []
    ingest_id = bootstrap(ctx, sent.append)
    assert [job.id for job in sent] == [ingest_id]
    with ctx.sessions() as session:
        assert active_version_id(session) == 1
        corpus = session.scalars(select(Corpus)).one()
        assert (corpus.name, corpus.source) == ("shakespeare", "builtin")
    run_ingest_job(ctx, ingest_id, sent.append)
    run_train_job(ctx, sent[-1].id)
    with ctx.sessions() as session:
        version = session.get(PoolVersion, active_version_id(session))
        assert version.id == 2 and version.corpus_ids == [corpus.id] and version.strategy == "naive"
        assert version.model_config_json["d_model"] == 32  # the configured shape (tests/service/conftest.py)
    assert bootstrap(ctx, sent.append) is None  # a second start: nothing new
    with ctx.sessions() as session:
        assert session.scalar(select(func.count(PoolVersion.id))) == 2
    ctx.close()


def test_a_pool_without_peer_layers_is_trained_by_fine_tuning_with_replay(tmp_path):
    """PEER_FFW=moe (a baseline): nothing to grow, so later corpora fine-tune everything with replay.
    On the embedded SQLite database."""
    settings = tiny_settings(tmp_path / "home", ffw="moe", moe_experts=4)
    upgrade(settings.resolved_database_url)
    ctx = ServiceContext.from_settings(settings)
    ensure_initial_version(ctx)
    sent: list[Job] = []
    for name, domain in (("english", "english"), ("code", "code")):
        text = domain_text(domain)
        with transaction(ctx.sessions) as session:
            _, job = accept_corpus(ctx, session, name, parse_upload(text.encode(), "text", 10**6), text, "text",
                                   True, {"activate": "always"})
        run_ingest_job(ctx, job.id, sent.append)
        run_train_job(ctx, sent[-1].id)
    with ctx.sessions() as session:
        strategies = [session.get(Job, j.id).metrics.get("strategy") for j in sent]
        version = session.get(PoolVersion, active_version_id(session))
    assert strategies == ["naive", "replay"] and version.experts == {} and len(version.corpus_ids) == 2
    ctx.close()
