"""The data lifecycle on PostgreSQL and SQLite with a real store: deleting versions and corpora (refused with
the reason while they are needed), pinning, the retention policy and garbage collection of checkpoint
directories, chunks, corpus files and temporary files."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from sqlalchemy import select, text

from peer_model.model import PEERTransformer
from service.cli import main
from service.context import ServiceContext
from service.db.migrate import upgrade
from service.db.models import Corpus, ExpertUsage, PoolVersion, Stream, StreamDocument
from service.db.session import transaction
from service.errors import Conflict
from service.jobs.ingest import parse_upload
from service.jobs.lease import create_job, request_cancel
from service.jobs.uploads import accept_corpus
from service.serving.usage import usage_total
from service.store.chunks import manifest_chunks
from service.store.lock import store_write
from service.store.retention import apply_retention, collect_garbage, delete_corpus, delete_version, set_pinned
from service.store.versions import activate, describe_pools, ensure_initial_version, live_version
from service.worker.housekeeping import Housekeeping

from .conftest import PG_HOST, create_pg_database, drop_pg_database, tiny_settings

HOUR = 3600.0


@pytest.fixture(params=["postgresql", "sqlite"])
def ctx(request, tmp_path):
    """A database of its own per test (the policy looks at every version there is)."""
    name = create_pg_database() if request.param == "postgresql" else None
    url = f"postgresql+psycopg://{PG_HOST}/{name}" if name else None
    settings = tiny_settings(tmp_path / "home", url, keep_versions=2, gc_grace_seconds=HOUR, chunk_bytes=1024)
    upgrade(settings.resolved_database_url)
    ctx = ServiceContext.from_settings(settings)
    yield ctx
    ctx.close()
    if name:
        drop_pg_database(name)


def publish(ctx, grow: int = 0) -> int:
    """A version row over a checkpoint written by the store (version 1 when there is none)."""
    created = ensure_initial_version(ctx)
    if created is not None and grow == 0:
        return created
    torch.manual_seed(grow)
    model = PEERTransformer(ctx.settings.fresh_model_config())
    if grow:
        model.grow(grow, tag=f"grown {grow}")
    key = f"versions/test-{time.monotonic_ns()}"
    ctx.store.save_model(key, model)
    experts, segments = describe_pools(model, None, [])
    with transaction(ctx.sessions) as session:
        version = PoolVersion(checkpoint=key, model_config_json=model.config.to_dict(), experts=experts,
                              segments=segments, corpus_ids=[])
        session.add(version)
        session.flush()
        return version.id


def row(ctx, model, key):
    with ctx.sessions() as session:
        return session.get(model, key)


def age(path, seconds: float = 2 * HOUR) -> None:
    """Make a store file (and a directory's entries) look written ``seconds`` ago."""
    then = time.time() - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (then, then))


def test_a_version_is_deleted_only_when_nothing_needs_it(ctx):
    active, pinned, needed, free = (publish(ctx, grow=g) for g in (0, 16, 32, 48))
    set_pinned(ctx, pinned, True)
    with transaction(ctx.sessions) as session:
        job = create_job(session, "train", [], {}, base_version_id=needed)
    for version_id, reason in ((active, "active version"), (pinned, "pinned"), (needed, rf"jobs \[{job.id}\] need it")):
        with pytest.raises(Conflict, match=reason):
            delete_version(ctx, version_id)
        assert row(ctx, PoolVersion, version_id).deleted_at is None
        assert ctx.store.has(row(ctx, PoolVersion, version_id).checkpoint)

    deleted = delete_version(ctx, free)
    assert deleted.deleted_at is not None and not ctx.store.has(deleted.checkpoint)
    assert delete_version(ctx, free).deleted_at == deleted.deleted_at  # again: nothing changes
    with transaction(ctx.sessions) as session:  # the row stays, but it is no version to use any more
        for purpose in ("activated", "trained from"):
            with pytest.raises(Conflict, match=f"can no longer be {purpose}"):
                activate(session, free, "rollback", "test") if purpose == "activated" else live_version(
                    session, free, purpose)
    with pytest.raises(Conflict, match="pinned"):
        set_pinned(ctx, free, True)

    with transaction(ctx.sessions) as session:
        request_cancel(session, job.id)
    set_pinned(ctx, pinned, False)
    for version_id in (pinned, needed):
        assert delete_version(ctx, version_id).deleted_at is not None


def test_retention_keeps_the_active_the_pinned_the_newest_and_what_jobs_need(ctx):
    versions = [publish(ctx, grow=16 * g) for g in range(7)]  # keep_versions = 2: the last two stay
    v1, v2, v3, v4, v5, v6, v7 = versions
    set_pinned(ctx, v2, True)
    with transaction(ctx.sessions) as session:
        create_job(session, "train", [], {}, base_version_id=v3)  # queued, trains from v3
        running = create_job(session, "train", [], {})
        running.state, running.metrics = "running", {"base_version_id": v4}  # unpinned: trains the then-active v4
    assert apply_retention(ctx, dry_run=True) == [v5]
    assert row(ctx, PoolVersion, v5).deleted_at is None
    assert apply_retention(ctx) == [v5]
    kept = {v: row(ctx, PoolVersion, v) for v in versions}
    assert [v for v, version in kept.items() if version.deleted_at is not None] == [v5]
    assert not ctx.store.has(kept[v5].checkpoint)
    assert all(ctx.store.has(kept[v].checkpoint) for v in (v1, v2, v3, v4, v6, v7))
    assert apply_retention(ctx) == []


def test_retention_keeps_the_most_recently_active_versions(ctx):
    """Rollback targets stay: versions nobody activated (a train key's jobs that failed their gate) cannot push
    the versions that were served out of the retention window."""
    v1, v2, v3, v4, v5, v6, v7 = [publish(ctx, grow=16 * g) for g in range(7)]  # keep_versions = 2
    for version_id in (v2, v3):
        with transaction(ctx.sessions) as session:
            activate(session, version_id, "test", "test")
    assert apply_retention(ctx) == [v1, v4, v5]
    assert row(ctx, PoolVersion, v2).deleted_at is None


def test_a_collection_between_a_checkpoint_and_its_version_row_takes_nothing(ctx):
    """With PEER_GC_GRACE_SECONDS 0 (allowed), a collection between the end of a checkpoint's write (the store lock
    released) and the commit of its version row took the just-published checkpoint. The publisher now holds the lock
    to the commit. The commit is held here by the activation lock, which the test takes first (PostgreSQL)."""
    if ctx.engine.dialect.name != "postgresql":
        pytest.skip("the commit is held by an advisory lock: PostgreSQL")
    from service.jobs.lease import claim_job
    from service.jobs.publish import publish_version
    from service.store.versions import ACTIVATION_LOCK

    ctx.settings = ctx.settings.model_copy(update={"gc_grace_seconds": 0.0})
    ensure_initial_version(ctx)
    with transaction(ctx.sessions) as session:
        job_id = create_job(session, "train", [], {}).id
    lease = claim_job(ctx.sessions, job_id, 3, 60)
    key = ctx.store.version_key(f"job-{job_id}-{lease[:12]}")
    torch.manual_seed(5)
    child = PEERTransformer(ctx.settings.fresh_model_config())
    published, collected = [], []
    with ctx.engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ACTIVATION_LOCK})
        publisher = threading.Thread(target=lambda: published.append(publish_version(
            ctx, job_id, lease, 1, child, {"1": []}, [], [], "naive", {}, (True, "ok"), "always", {})))
        publisher.start()
        deadline = time.monotonic() + 30
        while not ctx.store.has(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the checkpoint is whole; the publisher waits for the activation lock in its commit
        collector = threading.Thread(target=lambda: collected.append(collect_garbage(ctx)))
        collector.start()
        collector.join(1.0)
        assert ctx.store.has(key), "the collection took the checkpoint its version row is about to name"
        holder.rollback()
    publisher.join(30)
    collector.join(30)
    assert published and key not in collected[0].paths
    ctx.store.load_model(row(ctx, PoolVersion, published[0]).checkpoint)


def test_a_collection_between_a_corpus_text_and_its_row_takes_nothing(ctx):
    """The same for an upload: its text is written, then its row committed (PostgreSQL: the jobs table is held,
    so the upload waits between its text and its ingest job's row)."""
    if ctx.engine.dialect.name != "postgresql":
        pytest.skip("the commit is held by a table lock: PostgreSQL")
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings = ctx.settings.model_copy(update={"gc_grace_seconds": 0.0})
    ctx.settings = settings
    answers, collected = [], []
    with TestClient(create_app(settings, dispatch=lambda job: None)) as client, ctx.engine.connect() as holder:
        holder.execute(text("LOCK TABLE jobs IN EXCLUSIVE MODE"))
        uploader = threading.Thread(target=lambda: answers.append(client.post(
            "/v1/corpora", json={"name": "just written", "text": "text to keep", "train": False})))
        uploader.start()
        corpora = ctx.store.root / "corpora"
        deadline = time.monotonic() + 30
        while not any(corpora.glob("*/raw.txt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        collector = threading.Thread(target=lambda: collected.append(collect_garbage(ctx)))
        collector.start()
        collector.join(1.0)
        assert any(corpora.glob("*/raw.txt")), "the collection took the text its corpus row is about to name"
        holder.rollback()
        uploader.join(30)
        collector.join(30)
    corpus_id = answers[0].json()["corpus"]["id"]
    assert ctx.store.read_corpus(corpus_id, "raw") == "text to keep"


def test_garbage_collection_takes_what_nothing_refers_to_once_past_the_grace_period(ctx):
    live = publish(ctx)
    gone = publish(ctx, grow=64)
    root = ctx.store.root
    live_chunks = manifest_chunks(root / row(ctx, PoolVersion, live).checkpoint)
    gone_key = row(ctx, PoolVersion, gone).checkpoint
    gone_only = manifest_chunks(root / gone_key) - live_chunks
    assert gone_only
    delete_version(ctx, gone)

    # a failed attempt's checkpoint (no version row), young and old; an interrupted save's temporary directory
    torch.manual_seed(7)
    ctx.store.save_model("versions/job-9-0123456789ab", PEERTransformer(ctx.settings.fresh_model_config()))
    attempt_only = manifest_chunks(root / "versions/job-9-0123456789ab") - live_chunks
    (root / "versions/.job-10.tmp-abc").mkdir()
    (root / "versions/.job-10.tmp-abc/model.safetensors").write_bytes(b"half")
    # corpora: one live, one deleted whose files a crash left, a temporary file
    with transaction(ctx.sessions) as session:
        kept_corpus = Corpus(name="kept", source="upload", sha256="0" * 64, raw_bytes=1, documents=1)
        dead_corpus = Corpus(name="dead", source="upload", sha256="0" * 64, raw_bytes=1, documents=1, state="deleted")
        session.add_all([kept_corpus, dead_corpus])
        session.flush()
        dead_corpus.deleted_at = dead_corpus.created_at
    for corpus in (kept_corpus, dead_corpus):
        ctx.store.write_corpus(corpus.id, "raw", "text")
    stale_tmp = root / "corpora" / str(kept_corpus.id) / ".train.txt.123.tmp"
    stale_tmp.write_text("half")

    assert collect_garbage(ctx).paths == []  # everything is younger than the grace period
    for path in (root / "chunks", root / "versions", root / "corpora"):
        age(path)
    ctx.store.save_model("versions/job-11-0123456789ab", PEERTransformer(ctx.settings.fresh_model_config()))

    young = manifest_chunks(root / "versions/job-11-0123456789ab")  # renewed by that save
    dry = collect_garbage(ctx, dry_run=True)
    # the deleted version's chunks and the old attempt's, but none a live or young checkpoint still names
    expected = {"versions/job-9-0123456789ab", "versions/.job-10.tmp-abc", f"corpora/{dead_corpus.id}",
                f"corpora/{kept_corpus.id}/.train.txt.123.tmp",
                *(f"chunks/{h[:2]}/{h}" for h in (gone_only | attempt_only) - young)}
    assert set(dry.paths) == expected and dry.bytes > 0
    assert (root / "versions/job-9-0123456789ab").is_dir()  # a dry run removes nothing

    collected = collect_garbage(ctx)
    assert set(collected.paths) == expected
    assert not any((root / path).exists() for path in expected)
    # the young attempt (still publishing, as far as anyone knows) and everything live stay, and still load
    assert (root / "versions/job-11-0123456789ab").is_dir()
    assert ctx.store.load_model(row(ctx, PoolVersion, live).checkpoint) is not None
    assert ctx.store.load_model("versions/job-11-0123456789ab") is not None
    assert (root / "corpora" / str(kept_corpus.id) / "raw.txt").is_file()
    assert collect_garbage(ctx).paths == []


def test_a_corpus_is_deleted_only_when_no_live_job_uses_it(ctx):
    publish(ctx)
    text = "a small corpus of words\n" * 20
    with transaction(ctx.sessions) as session:
        stream = Stream(name="feed")
        session.add(stream)
        session.flush()
        corpus, ingest = accept_corpus(ctx, session, "feed", parse_upload(text.encode(), "text", 10_000), text, "text",
                                       True, {})
        session.add(StreamDocument(stream_id=stream.id, text=text, bytes=len(text), corpus_id=corpus.id))
    with pytest.raises(Conflict, match=f"jobs \\[{ingest.id}\\] use it"):
        delete_corpus(ctx, corpus.id)
    assert row(ctx, Corpus, corpus.id).state == "pending" and ctx.store.corpus_path(corpus.id, "raw").is_file()

    with transaction(ctx.sessions) as session:
        request_cancel(session, ingest.id)
    deleted = delete_corpus(ctx, corpus.id)
    assert deleted.state == "deleted" and deleted.deleted_at is not None
    assert not (ctx.store.root / "corpora" / str(corpus.id)).exists()
    with ctx.sessions() as session:  # the stream's copy of the text goes too
        assert session.scalars(select(StreamDocument).where(StreamDocument.corpus_id == corpus.id)).all() == []
    assert delete_corpus(ctx, corpus.id).deleted_at == deleted.deleted_at


def test_the_gc_command_lists_with_dry_run_and_then_removes(tmp_path, monkeypatch, capsys):
    settings = tiny_settings(tmp_path / "home", keep_versions=1, gc_grace_seconds=HOUR)
    upgrade(settings.resolved_database_url)
    ctx = ServiceContext.from_settings(settings)
    first, second = publish(ctx), publish(ctx, grow=16)
    ctx.store.save_model("versions/job-5-0123456789ab", PEERTransformer(settings.fresh_model_config()))
    age(ctx.store.root / "versions/job-5-0123456789ab")
    first_key = row(ctx, PoolVersion, first).checkpoint
    with transaction(ctx.sessions) as session:
        activate(session, second, "newer", "test")
    for name, value in (("HOME", tmp_path / "home"), ("KEEP_VERSIONS", 1), ("GC_GRACE_SECONDS", HOUR),
                        ("BOOTSTRAP_CORPUS", "")):
        monkeypatch.setenv(f"PEER_{name}", str(value))

    main(["gc", "--dry-run"])
    out = capsys.readouterr().out
    assert f"would delete versions [{first}]" in out and "versions/job-5-0123456789ab" in out
    assert ctx.store.has(first_key) and ctx.store.has("versions/job-5-0123456789ab")

    main(["gc"])
    out = capsys.readouterr().out
    assert f"deleted versions [{first}]" in out and "versions/job-5-0123456789ab" in out
    assert not ctx.store.has(first_key) and not ctx.store.has("versions/job-5-0123456789ab")
    assert row(ctx, PoolVersion, first).deleted_at is not None
    ctx.close()


def test_housekeeping_folds_usage_applies_retention_and_collects_garbage(ctx):
    active, old, newer, newest = (publish(ctx, grow=g) for g in (0, 16, 32, 48))
    ctx.store.save_model("versions/job-7-0123456789ab", PEERTransformer(ctx.settings.fresh_model_config()))
    age(ctx.store.root / "versions/job-7-0123456789ab")
    with transaction(ctx.sessions) as session:
        now = row(ctx, PoolVersion, active).created_at
        session.add(ExpertUsage(version_id=active, layer=1, window_start=now, window_end=now, tokens=3,
                                counts=bytes(16)))
    housekeeping = Housekeeping(ctx)
    housekeeping.run_due()
    assert row(ctx, PoolVersion, old).deleted_at is not None  # keep_versions = 2: newer and newest stay
    assert all(row(ctx, PoolVersion, v).deleted_at is None for v in (active, newer, newest))
    assert not ctx.store.has("versions/job-7-0123456789ab")
    with ctx.sessions() as session:
        assert session.scalars(select(ExpertUsage.folded)).all() == [True]
        assert usage_total(session, active, 1).tokens == 3
    publish(ctx, grow=64)
    housekeeping.run_due()  # not due again before PEER_HOUSEKEEPING_SECONDS
    assert row(ctx, PoolVersion, newer).deleted_at is None
    assert housekeeping.run()["versions_deleted"] == [newer]


def test_a_chunk_reused_while_garbage_is_collected_is_kept(ctx, monkeypatch):
    """The race service/store/lock.py closes: a checkpoint writer reuses (renews) a chunk only an unreferenced
    checkpoint named, and a collector that read the manifests before the writer's existed would delete it.
    The collector runs here, with no grace period, while the writer is paused after its first renewal: it
    waits for the writer's manifest, collects the unreferenced checkpoint, and the new one loads whole."""
    ctx.settings = ctx.settings.model_copy(update={"gc_grace_seconds": 0.0})
    torch.manual_seed(0)
    model = PEERTransformer(ctx.settings.fresh_model_config())
    ctx.store.save_model("versions/gone", model)  # what a deleted version left: chunks nothing else names
    experts, segments = describe_pools(model, None, [])
    with transaction(ctx.sessions) as session:  # the version whose checkpoint the writer is writing
        session.add(PoolVersion(checkpoint="versions/reused", model_config_json=model.config.to_dict(),
                                experts=experts, segments=segments, corpus_ids=[]))
    renewed, resume, renew = threading.Event(), threading.Event(), ctx.store.files.renew

    def paused_renew(key):
        found = renew(key)
        renewed.set()
        resume.wait(30)
        return found

    monkeypatch.setattr(ctx.store.files, "renew", paused_renew)
    def write() -> None:
        with store_write(ctx):
            ctx.store.save_model("versions/reused", model)

    writer = threading.Thread(target=write)
    writer.start()
    assert renewed.wait(30)
    collected = []
    collector = threading.Thread(target=lambda: collected.append(collect_garbage(ctx)))
    collector.start()
    collector.join(1.0)
    assert collector.is_alive(), "the collector must wait for the writer"
    resume.set()
    writer.join(30)
    collector.join(30)
    assert "versions/gone" in collected[0].paths and not ctx.store.has("versions/gone")
    loaded = ctx.store.load_model("versions/reused")  # CheckpointError if a chunk had been deleted
    assert loaded.config == model.config
