"""The file store: corpus text and version checkpoints under one root directory.

Layout (paths relative to the root are what the database records)::

    corpora/<id>/raw.txt            the upload as received (validated UTF-8)
    corpora/<id>/train.txt, val.txt the ingested splits
    versions/<id>/                  a complete checkpoint (peer_model.checkpoint)

Every file is written to a temporary name and renamed into place, so a reader (or a crash) never sees
half a file. The root may be a shared volume (docker-compose mounts one into the api and the workers).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from peer_model.checkpoint import load_checkpoint, save_checkpoint
from peer_model.model import PEERTransformer


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- corpora -------------------------------------------------------------------------------

    def corpus_path(self, corpus_id: int, part: str) -> Path:
        if part not in ("raw", "train", "val"):
            raise ValueError(f"unknown corpus part {part!r}")
        return self.root / "corpora" / str(corpus_id) / f"{part}.txt"

    def write_corpus(self, corpus_id: int, part: str, text: str) -> Path:
        return self._write_text(self.corpus_path(corpus_id, part), text)

    def read_corpus(self, corpus_id: int, part: str) -> str:
        return self.corpus_path(corpus_id, part).read_text(encoding="utf-8")

    # ---- versions ------------------------------------------------------------------------------

    @staticmethod
    def version_key(name: str) -> str:
        return f"versions/{name}"

    def save_model(self, key: str, model: PEERTransformer, extra: dict | None = None) -> None:
        save_checkpoint(model, self.root / key, extra)

    def load_model(self, key: str, device: str = "cpu") -> PEERTransformer:
        return load_checkpoint(self.root / key, device)

    def has(self, key: str) -> bool:
        return (self.root / key).exists()

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
