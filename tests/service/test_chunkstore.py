"""Chunked checkpoints: versions share the tensor blocks that did not change, loads check every hash, and the
plain checkpoints written before chunking still load."""
from __future__ import annotations

import os

import pytest
import torch

from peer_model.checkpoint import CheckpointError, save_checkpoint
from peer_model.model import PEERTransformer
from service.store.chunks import MANIFEST, manifest_chunks
from service.store.store import Store

from .conftest import TINY_MODEL, tiny_settings

CHUNK_BYTES = 1024  # the tiny expert tables (256 x 32 fp32 = 32 KiB) become 32 blocks of 8 rows


@pytest.fixture()
def model(tmp_path) -> PEERTransformer:
    torch.manual_seed(0)
    return PEERTransformer(tiny_settings(tmp_path).fresh_model_config())


def same_weights(a: PEERTransformer, b: PEERTransformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_chunked_checkpoint_loads_the_same_model(tmp_path, model):
    store = Store(tmp_path, CHUNK_BYTES)
    stats = store.save_model("versions/a", model)
    assert (tmp_path / "versions/a" / MANIFEST).is_file()
    assert not (tmp_path / "versions/a/model.safetensors").exists()
    assert 0 < stats.new_bytes <= stats.bytes  # identical blocks (norm weights of ones) are stored once
    loaded = store.load_model("versions/a")
    assert same_weights(model, loaded)
    assert loaded.lm_head.weight is loaded.embed.weight  # tied, stored once


def test_a_grown_model_with_old_experts_unchanged_stores_about_its_new_rows(tmp_path, model):
    store = Store(tmp_path, CHUNK_BYTES)
    first = store.save_model("versions/parent", model)
    layer = next(iter(model.peer_layers().values()))
    old_rows = layer.expert_down.shape[0]
    model.grow(64, tag="new")  # appends rows to each table (and sub-keys); old rows stay bit-identical
    new_rows = layer.expert_down.shape[0] - old_rows
    second = store.save_model("versions/child", model)
    table_growth = 2 * new_rows * TINY_MODEL["d_model"] * 4  # down and up rows of the new segment, fp32
    assert second.bytes > first.bytes
    # only the blocks holding new rows and the small tensors that changed (sub-keys) are new
    assert second.new_bytes < 0.25 * second.bytes
    assert second.new_bytes <= table_growth + 4 * CHUNK_BYTES
    assert manifest_chunks(tmp_path / "versions/parent") & manifest_chunks(tmp_path / "versions/child")
    grown = store.load_model("versions/child")
    assert same_weights(model, grown)
    assert next(iter(grown.peer_layers().values())).expert_down.shape[0] == old_rows + new_rows


def test_a_corrupted_or_missing_chunk_is_a_checkpoint_error(tmp_path, model):
    store = Store(tmp_path, CHUNK_BYTES)
    store.save_model("versions/a", model)
    digest = sorted(manifest_chunks(tmp_path / "versions/a"))[0]
    path = store.chunks.path(digest)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        store.load_model("versions/a")
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        store.load_model("versions/a")


def test_rewriting_a_version_reuses_its_chunks_and_renews_them(tmp_path, model):
    store = Store(tmp_path, CHUNK_BYTES)
    store.save_model("versions/a", model)
    digest = sorted(manifest_chunks(tmp_path / "versions/a"))[0]
    path = store.chunks.path(digest)
    os.utime(path, (0, 0))  # as if written long ago
    again = store.save_model("versions/b", model)
    assert again.new_bytes == 0
    assert path.stat().st_mtime > 0  # renewed: garbage collection's grace period protects it again


def test_a_plain_checkpoint_from_before_chunking_still_loads(tmp_path, model):
    save_checkpoint(model, tmp_path / "versions/initial")
    store = Store(tmp_path, CHUNK_BYTES)
    assert same_weights(model, store.load_model("versions/initial"))


def test_what_the_store_writes_is_durable_with_its_directory_entry(tmp_path, model, monkeypatch):
    """A file renamed into place is on disk only once its directory is fsynced after the rename: after a power
    loss a committed corpus or version row could name a missing file (and garbage collection then took the
    orphaned temporary one). Every rename of a corpus part or a checkpoint is followed by its directory's fsync."""
    from pathlib import Path

    store, events = Store(tmp_path / "store", CHUNK_BYTES), []
    replace, fsync = os.replace, os.fsync

    def recorded_replace(source, target, *args, **kwargs):
        replace(source, target, *args, **kwargs)
        events.append(("replace", Path(target)))

    def recorded_fsync(fd):
        fsync(fd)
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))

    monkeypatch.setattr(os, "replace", recorded_replace)
    monkeypatch.setattr(os, "fsync", recorded_fsync)
    store.write_corpus(7, "raw", "some text")
    path = store.corpus_path(7, "raw")
    assert ("fsync", path.parent) in events[events.index(("replace", path)):]
    events.clear()
    store.save_model("versions/v", model)
    installed = max(i for i, event in enumerate(events) if event == ("replace", store.root / "versions" / "v"))
    assert ("fsync", store.root / "versions") in events[installed:]
