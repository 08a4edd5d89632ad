"""The store: corpus text and version checkpoints under one root, a local directory or an object store.

Layout (keys relative to the root are what the database records)::

    corpora/<id>/raw.txt            the upload as received (validated UTF-8)
    corpora/<id>/train.txt, val.txt the ingested splits
    probes/<id>/probe.jsonl         a probe as uploaded (validated JSONL: peer_model/probe.py)
    versions/<name>/                a checkpoint: peer_model's config and tokenizer files, and a manifest
                                    of content-addressed chunks (service/store/chunks.py); versions written
                                    before chunking hold a plain ``model.safetensors`` and still load
    chunks/<hash[:2]>/<hash>        tensor bytes, shared by every version whose manifest names them

The root is ``PEER_STORE_DIR`` (a shared volume: docker-compose mounts one into the api and the workers)
or ``PEER_STORE_URL`` (``s3://bucket/prefix``); service/store/files.py holds what differs between the two and
how each keeps readers from seeing half a file. The rest of the service uses only this class's methods.
"""
from __future__ import annotations

from pathlib import Path

from peer_model.model import PEERTransformer

from .chunks import MANIFEST, ChunkStore, WriteStats, chunks_named, parse_manifest
from .files import LocalFiles, open_files

DEFAULT_CHUNK_BYTES = 1 << 20


class Store:
    """``root``: a local directory (a path or ``file://`` URL) or an fsspec URL such as ``s3://bucket/prefix``,
    reached with ``options`` (PEER_STORE_OPTIONS), ``concurrency`` chunk requests at once (PEER_STORE_CONCURRENCY)."""

    def __init__(self, root: Path | str, chunk_bytes: int = DEFAULT_CHUNK_BYTES, options: dict | None = None,
                 concurrency: int = 16):
        self.files = open_files(root, options, concurrency)
        self.root = self.files.root  # a Path for a local store, the URL of an object store
        self.chunks = ChunkStore(self.files, chunk_bytes)

    # ---- corpora -------------------------------------------------------------------------------

    @staticmethod
    def corpus_key(corpus_id: int, part: str) -> str:
        if part not in ("raw", "train", "val"):
            raise ValueError(f"unknown corpus part {part!r}")
        return f"corpora/{corpus_id}/{part}.txt"

    def corpus_path(self, corpus_id: int, part: str) -> Path:
        """The part's file in a local store."""
        if not isinstance(self.files, LocalFiles):
            raise TypeError(f"{self.root} is an object store: corpus parts have no local path")
        return self.files.path(self.corpus_key(corpus_id, part))

    def write_corpus(self, corpus_id: int, part: str, text: str | bytes | bytearray) -> str:
        """Write the part (text, or its UTF-8 bytes as they are: no second copy of a large upload)."""
        key = self.corpus_key(corpus_id, part)
        self.files.write(key, text.encode("utf-8") if isinstance(text, str) else text)
        return key

    def read_corpus_bytes(self, corpus_id: int, part: str) -> bytes:
        return bytes(self.files.read(self.corpus_key(corpus_id, part)))

    def read_corpus(self, corpus_id: int, part: str) -> str:
        """The part's text, its line ends read as a text-mode file reads them (\\r\\n and \\r become \\n)."""
        text = self.read_corpus_bytes(corpus_id, part).decode("utf-8")
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def has_corpus(self, corpus_id: int, part: str) -> bool:
        return self.files.exists(self.corpus_key(corpus_id, part))

    def remove_corpus(self, corpus_id: int) -> None:
        self.files.remove(f"corpora/{corpus_id}")

    # ---- probes --------------------------------------------------------------------------------

    @staticmethod
    def probe_key(probe_id: int) -> str:
        return f"probes/{probe_id}/probe.jsonl"

    def write_probe(self, probe_id: int, data: bytes) -> str:
        key = self.probe_key(probe_id)
        self.files.write(key, data)
        return key

    def read_probe(self, probe_id: int) -> str:
        return bytes(self.files.read(self.probe_key(probe_id))).decode("utf-8")

    def remove_probe(self, probe_id: int) -> None:
        self.files.remove(f"probes/{probe_id}")

    # ---- versions ------------------------------------------------------------------------------

    @staticmethod
    def version_key(name: str) -> str:
        return f"versions/{name}"

    def save_model(self, key: str, model: PEERTransformer, extra: dict | None = None) -> WriteStats:
        """Write the model as a chunked checkpoint; returns the bytes it references and the bytes it added."""
        stats = WriteStats()
        self.files.save_checkpoint(key, model, extra, self.chunks.weight_writer(stats))
        return stats

    def load_model(self, key: str, device: str = "cpu") -> PEERTransformer:
        """Load a chunked (hashes checked) or plain checkpoint; CheckpointError when it is missing or damaged."""
        return self.files.load_checkpoint(key, device, self.chunks.read_weights)

    def has(self, key: str) -> bool:
        return self.files.has_checkpoint(key)

    def remove(self, key: str) -> None:
        """Delete a checkpoint (and the backup an interrupted local overwrite may have left); the chunks it
        referenced stay until garbage collection finds them unreferenced."""
        folder, name = key.rsplit("/", 1)
        for stored in (key, f"{folder}/.{name}.old"):
            self.files.remove(stored)

    def checkpoint_chunks(self, key: str) -> set[str]:
        """The hashes a checkpoint's manifest names (none for a plain checkpoint)."""
        manifest = f"{key}/{MANIFEST}"
        try:
            data = self.files.read(manifest)
        except (FileNotFoundError, NotADirectoryError):
            return set()
        return chunks_named(parse_manifest(bytes(data), f"{self.root}/{manifest}"))
