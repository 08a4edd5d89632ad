"""The store on an object store (PEER_STORE_URL=s3://bucket/prefix): checkpoints, corpora, garbage collection and a
whole job against a real S3-protocol server (moto's, started here on a free port), nothing on the local disk."""
from __future__ import annotations

import dataclasses
import time
import uuid

import boto3
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from peer_model.checkpoint import CheckpointError
from peer_model.model import PEERTransformer
from service.api.app import create_app
from service.context import ServiceContext
from service.db.migrate import upgrade
from service.db.models import Corpus
from service.db.session import transaction
from service.settings import Settings
from service.store.files import LocalFiles
from service.store.retention import apply_retention, collect_garbage
from service.store.store import Store
from service.store.versions import ensure_initial_version

from .conftest import domain_text, free_port, tiny_settings

BUCKET = "peer-store"
CHUNK_BYTES = 1024  # the tiny expert tables become many chunks


@pytest.fixture(scope="module")
def s3_options():
    """An S3 server (moto) on loopback with one bucket; the options PEER_STORE_OPTIONS would carry."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test", "secret": "test",
               "client_kwargs": {"region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield options
    server.stop()


@pytest.fixture()
def store_url() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"  # every test its own prefix


@pytest.fixture()
def s3_store(store_url, s3_options) -> Store:
    return Store(store_url, CHUNK_BYTES, s3_options)


def tiny_model(tmp_path, seed: int = 0) -> PEERTransformer:
    torch.manual_seed(seed)
    return PEERTransformer(tiny_settings(tmp_path).fresh_model_config())


def test_a_checkpoint_round_trips_bit_identical_and_a_damaged_chunk_is_caught(tmp_path, s3_store):
    model = tiny_model(tmp_path)
    stats = s3_store.save_model("versions/a", model)
    assert s3_store.has("versions/a") and 0 < stats.new_bytes <= stats.bytes
    objects = s3_store.files.children("versions/a")
    assert "manifest.json" in objects and "model.safetensors" not in objects  # tensors live only in chunks
    loaded = s3_store.load_model("versions/a")
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert s3_store.save_model("versions/b", model).new_bytes == 0  # every chunk already there: only referenced

    digest = sorted(s3_store.checkpoint_chunks("versions/a"))[0]
    s3_store.files.write(s3_store.chunks.key(digest), b"not the bytes of this hash")
    with pytest.raises(CheckpointError, match="corrupted"):
        s3_store.load_model("versions/a")
    s3_store.files.remove(s3_store.chunks.key(digest))
    with pytest.raises(CheckpointError, match="missing"):
        s3_store.load_model("versions/b")


def test_a_checkpoint_without_its_manifest_is_not_there(tmp_path, s3_store):
    """Object stores have no rename: the manifest, written last, is what makes a checkpoint complete."""
    s3_store.save_model("versions/whole", tiny_model(tmp_path))
    s3_store.files.write("versions/half/config.json", bytes(s3_store.files.read("versions/whole/config.json")))
    assert not s3_store.has("versions/half")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        s3_store.load_model("versions/half")
    s3_store.save_model("versions/whole-1", tiny_model(tmp_path))
    s3_store.remove("versions/whole")  # a prefix of another key's name: that one stays
    assert not s3_store.has("versions/whole") and s3_store.has("versions/whole-1")


def test_a_corpus_round_trips(s3_store):
    text = "première ligne\r\nzweite Zeile\n" + "x" * 5000
    s3_store.write_corpus(1, "raw", text)
    s3_store.write_corpus(10, "raw", "another corpus")
    assert s3_store.read_corpus_bytes(1, "raw") == text.encode("utf-8")
    assert s3_store.read_corpus(1, "raw") == text.replace("\r\n", "\n")  # as a local store's text-mode read
    assert s3_store.has_corpus(1, "raw") and not s3_store.has_corpus(1, "train")
    s3_store.remove_corpus(1)
    assert not s3_store.has_corpus(1, "raw") and s3_store.read_corpus(10, "raw") == "another corpus"


def test_an_unreachable_object_store_is_an_os_error(tmp_path):
    """What a full disk is locally: an upload answers 507, a job fails with the reason (not a 500)."""
    dead = Store(f"s3://{BUCKET}/x", options={"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k",
                                              "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}},
                                              "client_kwargs": {"region_name": "us-east-1"}})
    with pytest.raises(OSError, match="the object store failed: EndpointConnectionError"):
        dead.write_corpus(1, "raw", "text")
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        dead.load_model("versions/a")


def _write_in_child(store: Store) -> None:
    store.write_corpus(2, "raw", "from the child")


def test_a_store_opened_before_a_fork_works_in_the_child(s3_store):
    """A prefork worker inherits the parent's store: s3fs's event loop and our thread pool are not fork-safe,
    so the child makes its own."""
    import multiprocessing

    s3_store.write_corpus(1, "raw", "from the parent")  # the parent's client and pool exist now
    child = multiprocessing.get_context("fork").Process(target=_write_in_child, args=(s3_store,))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and s3_store.read_corpus(2, "raw") == "from the child"


def s3_settings(tmp_path, store_url, s3_options, **overrides) -> Settings:
    return tiny_settings(tmp_path / "home", store_url=store_url, store_options=s3_options, **overrides)


def test_garbage_collection_walks_the_object_store(tmp_path, store_url, s3_options):
    settings = s3_settings(tmp_path, store_url, s3_options)
    upgrade(settings.resolved_database_url)
    ctx = ServiceContext.from_settings(settings)
    ensure_initial_version(ctx)
    store = ctx.store
    live_chunks = store.checkpoint_chunks("versions/initial")
    store.save_model("versions/job-9-0123456789ab", tiny_model(tmp_path, seed=7))  # a failed attempt's
    attempt_only = store.checkpoint_chunks("versions/job-9-0123456789ab") - live_chunks
    assert attempt_only
    with transaction(ctx.sessions) as session:
        kept = Corpus(name="kept", source="upload", sha256="0" * 64, raw_bytes=1, documents=1)
        dead = Corpus(name="dead", source="upload", sha256="0" * 64, raw_bytes=1, documents=1, state="deleted")
        session.add_all([kept, dead])
        session.flush()
        dead.deleted_at = dead.created_at
    for corpus in (kept, dead):
        store.write_corpus(corpus.id, "raw", "text")

    assert collect_garbage(ctx).paths == []  # everything is younger than the grace period (an hour)
    now = dataclasses.replace(ctx, settings=settings.model_copy(update={"gc_grace_seconds": 0.0}))
    expected = {"versions/job-9-0123456789ab", f"corpora/{dead.id}", *(store.chunks.key(h) for h in attempt_only)}
    dry = collect_garbage(now, dry_run=True)
    assert set(dry.paths) == expected and dry.bytes > 0 and store.has("versions/job-9-0123456789ab")
    assert set(collect_garbage(now).paths) == expected
    assert not store.has("versions/job-9-0123456789ab") and not store.has_corpus(dead.id, "raw")
    assert not any(store.files.exists(store.chunks.key(h)) for h in attempt_only)
    store.load_model("versions/initial")  # every chunk the live version names is still there
    assert store.read_corpus(kept.id, "raw") == "text"
    ctx.close()


def test_a_chunk_reused_after_it_was_judged_garbage_survives_the_collection(s3_store):
    """S3 has no rename to move a chunk aside: the writer renews it (a server-side copy onto itself) and the
    collector reads its time again before deleting it."""
    digest, new = s3_store.chunks.put(b"some tensor bytes", set())
    assert new
    judged = time.time()  # the collector's cutoff: the chunk is older
    time.sleep(1.1)  # S3 times have a resolution of a second
    assert s3_store.chunks.put(b"some tensor bytes", set()) == (digest, False)  # a save reuses it: renewed
    s3_store.files.collect(s3_store.chunks.key(digest), judged)
    assert s3_store.chunks.get(digest) == b"some tensor bytes"
    s3_store.files.collect(s3_store.chunks.key(digest), time.time() + 1)
    assert not s3_store.files.exists(s3_store.chunks.key(digest))


def test_a_job_runs_end_to_end_on_the_object_store(tmp_path, store_url, s3_options):
    """Upload → ingest → train → publish → the API loads and serves the new version, then retention and garbage
    collection, all through S3."""
    from service.worker.inline import InlineWorker

    settings = s3_settings(tmp_path, store_url, s3_options)
    upgrade(settings.resolved_database_url)
    ctx = ServiceContext.from_settings(settings)
    ensure_initial_version(ctx)
    with InlineWorker(settings) as worker, TestClient(create_app(settings, dispatch=worker.dispatch)) as client:
        accepted = client.post("/v1/corpora", params={"name": "english", "train": "false"},
                               content=domain_text("english", 200), headers={"content-type": "text/plain"}).json()
        worker.join()
        job = client.post("/v1/jobs", json={"corpus_ids": [accepted["corpus"]["id"]],
                                            "options": {"activate": "always"}}).json()
        worker.join()
        job = client.get(f"/v1/jobs/{job['id']}").json()
        assert job["state"] == "succeeded", job
        version = client.get(f"/v1/versions/{job['result_version_id']}").json()
        assert ctx.store.has(version["checkpoint"]) and ctx.store.has_corpus(accepted["corpus"]["id"], "train")
        deadline = time.monotonic() + 30
        while True:  # the API's watcher swaps to the activated version
            generated = client.post("/v1/generate", json={"prompt": "the", "max_tokens": 4})
            assert generated.status_code == 200
            if generated.json()["version"] == version["id"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert generated.json()["version"] == version["id"]
    # the lifecycle on the same store: retention deletes version 1, garbage collection its chunks alone
    policy = dataclasses.replace(ctx, settings=settings.model_copy(update={"keep_versions": 1,
                                                                           "gc_grace_seconds": 0.0}))
    assert apply_retention(policy) == [1] and not ctx.store.has("versions/initial")
    collected = collect_garbage(policy).paths
    assert collected and all(path.startswith("chunks/") for path in collected)
    ctx.store.load_model(version["checkpoint"])
    assert not settings.resolved_store_dir.exists()  # nothing went to the local disk
    ctx.close()


def test_store_settings(tmp_path, monkeypatch, s3_options):
    import json

    monkeypatch.setenv("PEER_STORE_OPTIONS", json.dumps(s3_options))
    monkeypatch.setenv("PEER_STORE_URL", f"s3://{BUCKET}/x")
    assert Settings().store_options == s3_options and Settings().store_root == f"s3://{BUCKET}/x"
    with pytest.raises(ValidationError, match="no filesystem for this URL's scheme"):
        Settings(store_url="nosuchscheme://bucket/x")
    local = Settings(home=tmp_path, store_url=f"file://{tmp_path}/elsewhere")
    assert local.resolved_store_dir == tmp_path / "elsewhere"
    assert isinstance(Store(local.store_root).files, LocalFiles)
