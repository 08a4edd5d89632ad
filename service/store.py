"""The file store: corpus text and version checkpoints under one root directory.

Layout (paths relative to the root are what the database records)::

    corpora/<id>/raw.txt            the upload as received (validated UTF-8)
    corpora/<id>/train.txt, val.txt the ingested splits
    versions/<name>/                a checkpoint: peer_model's config and tokenizer files, and a manifest
                                    of content-addressed chunks (service/chunkstore.py); versions written
                                    before chunking hold a plain ``model.safetensors`` and still load
    chunks/<hash[:2]>/<hash>        tensor bytes, shared by every version whose manifest names them

Every file is written to a temporary name and renamed into place, so a reader (or a crash) never sees
half a file. The root may be a shared volume (docker-compose mounts one into the api and the workers).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from peer_model.checkpoint import load_checkpoint, save_checkpoint
from peer_model.model import PEERTransformer

from .chunkstore import ChunkStore, WriteStats

DEFAULT_CHUNK_BYTES = 1 << 20


class Store:
    def __init__(self, root: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.chunks = ChunkStore(self.root / "chunks", chunk_bytes)

    # ---- corpora -------------------------------------------------------------------------------

    def corpus_path(self, corpus_id: int, part: str) -> Path:
        if part not in ("raw", "train", "val"):
            raise ValueError(f"unknown corpus part {part!r}")
        return self.root / "corpora" / str(corpus_id) / f"{part}.txt"

    def write_corpus(self, corpus_id: int, part: str, text: str) -> Path:
        return self._write_text(self.corpus_path(corpus_id, part), text)

    def read_corpus(self, corpus_id: int, part: str) -> str:
        return self.corpus_path(corpus_id, part).read_text(encoding="utf-8")

    def remove_corpus(self, corpus_id: int) -> None:
        shutil.rmtree(self.root / "corpora" / str(corpus_id), ignore_errors=True)

    # ---- versions ------------------------------------------------------------------------------

    @staticmethod
    def version_key(name: str) -> str:
        return f"versions/{name}"

    def save_model(self, key: str, model: PEERTransformer, extra: dict | None = None) -> WriteStats:
        """Write the model as a chunked checkpoint; returns the bytes it references and the bytes it added."""
        stats = WriteStats()
        save_checkpoint(model, self.root / key, extra, write_weights=self.chunks.weight_writer(stats))
        return stats

    def load_model(self, key: str, device: str = "cpu") -> PEERTransformer:
        """Load a chunked (hashes checked) or plain checkpoint; CheckpointError when it is missing or damaged."""
        return load_checkpoint(self.root / key, device, read_weights=self.chunks.read_weights)

    def has(self, key: str) -> bool:
        return (self.root / key).exists()

    def remove(self, key: str) -> None:
        """Delete a checkpoint directory (and the backup an interrupted overwrite may have left); the chunks
        it referenced stay until garbage collection finds them unreferenced."""
        path = self.root / key
        for folder in (path, path.with_name(f".{path.name}.old")):
            shutil.rmtree(folder, ignore_errors=True)

    # ---- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _write_text(path: Path, text: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
