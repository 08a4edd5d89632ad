"""Content-addressed chunks: versions share the tensor bytes that did not change.

A tensor is cut along its first dimension into blocks of whole rows of about ``chunk_bytes`` (a tensor
no larger than that is one chunk); each block is stored once, under its sha256, as
``chunks/<hash[:2]>/<hash>``. A version's checkpoint directory keeps peer_model's ``config.json`` and
tokenizer files, and instead of ``model.safetensors`` a ``manifest.json``::

    {"format": "peer-chunks-1", "tensors": {name: {"dtype": "float32", "shape": [...], "chunks": [hash, ...]}}}

Expert ids are stable and growth appends rows, so a job that grows a segment and leaves the old experts
as they were (grow_freeze_protect) rewrites only the blocks that hold new rows (and the tensors that
trained); every other block already exists and is only referenced again. Loading reads every chunk and
checks its hash: a missing or corrupted chunk is a :class:`CheckpointError`, never silently wrong weights.

Chunks live wherever the store does (service/store/files.py: a local directory, crash-safe by temporary
names and renames; or an object store, each chunk one PUT, read straight into the tensor). The manifest
is written after every chunk it names. A chunk that already exists gets its modification time renewed,
so garbage collection (service/store/retention.py, which spares files younger than its grace period) cannot
take it while a version that reuses it is still being written.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from peer_model.checkpoint import WEIGHTS, CheckpointError
from peer_model.model import PEERTransformer

from .files import MANIFEST, LocalFiles, ObjectFiles

FORMAT = "peer-chunks-1"


@dataclass
class WriteStats:
    """What one checkpoint save stored: ``bytes`` referenced by its manifest, ``new_bytes`` actually written
    (chunks that did not exist yet)."""

    chunks: int = 0
    new_chunks: int = 0
    bytes: int = 0
    new_bytes: int = 0


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in a chunk manifest")
    return dtype


def _unique_tensors(model: PEERTransformer) -> dict[str, torch.Tensor]:
    """The state dict without aliases (the tied output projection is stored once, as ``embed.weight``,
    as peer_model's own checkpoints do)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        alias = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and alias in seen:
            continue
        seen.add(alias)
        state[name] = tensor
    return state


def _batches(items, size: int) -> list:
    """``items`` (a list or range) in consecutive groups of ``size``: the chunks a store moves at once."""
    return [items[i:i + size] for i in range(0, len(items), size)]


class ChunkStore:
    def __init__(self, files: LocalFiles | ObjectFiles, chunk_bytes: int):
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.files = files
        self.chunk_bytes = chunk_bytes

    @staticmethod
    def key(digest: str) -> str:
        return f"chunks/{digest[:2]}/{digest}"

    def path(self, digest: str) -> Path:
        """The chunk's file in a local store."""
        return self.files.path(self.key(digest))

    # ---- chunks ----------------------------------------------------------------------------------

    def put(self, data: bytes, written: set[str]) -> tuple[str, bool]:
        """Store ``data`` under its hash; returns (hash, whether it was new)."""
        digest = hashlib.sha256(data).hexdigest()
        key = self.key(digest)
        if self.files.renew(key):  # in use again: young for the garbage collector's grace period
            return digest, False
        self.files.write(key, data, sync_directory=False)  # new, or just collected; its folder: sync_parents
        written.add(key)
        return digest, True

    def get(self, digest: str) -> bytearray:
        """The chunk's bytes, checked against its hash (CheckpointError when missing or corrupted)."""
        try:
            data = self.files.read(self.key(digest))
        except OSError as exc:
            raise CheckpointError(f"chunk {digest} is missing from the store: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"chunk {digest} is corrupted: its content does not match its hash")
        return data

    # ---- tensors ---------------------------------------------------------------------------------

    def _rows_per_chunk(self, tensor: torch.Tensor) -> int:
        rows = tensor.shape[0] if tensor.dim() else 1
        nbytes = tensor.numel() * tensor.element_size()
        if rows == 0 or nbytes <= self.chunk_bytes:
            return max(rows, 1)
        return max(1, self.chunk_bytes // (nbytes // rows))

    def put_tensor(self, tensor: torch.Tensor, stats: WriteStats, written: set[str]) -> dict:
        tensor = tensor.detach().cpu().contiguous()
        flat = tensor.reshape(-1).view(torch.uint8)
        row_bytes = flat.numel() // tensor.shape[0] if tensor.dim() and tensor.shape[0] else flat.numel()
        step = self._rows_per_chunk(tensor) * row_bytes
        digests = []
        for group in _batches(range(0, flat.numel(), max(step, 1)), self.files.parallel):
            blocks = [flat[start:start + step].numpy().tobytes() for start in group]
            for data, (digest, new) in zip(blocks, self.files.map(lambda data: self.put(data, written), blocks)):
                digests.append(digest)
                stats.chunks += 1
                stats.bytes += len(data)
                if new:
                    stats.new_chunks += 1
                    stats.new_bytes += len(data)
        return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "chunks": digests}

    def get_tensor(self, name: str, entry: dict) -> torch.Tensor:
        try:
            dtype, shape, digests = _dtype(entry["dtype"]), [int(n) for n in entry["shape"]], list(entry["chunks"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"tensor {name}: invalid manifest entry: {exc}") from exc
        tensor = torch.empty(shape, dtype=dtype)
        flat = tensor.reshape(-1).view(torch.uint8)
        offset = 0
        for group in _batches(digests, self.files.parallel):
            for data in self.files.map(self.get, group):
                if offset + len(data) > flat.numel():
                    raise CheckpointError(f"tensor {name}: its chunks hold more bytes than its shape {shape}")
                flat[offset:offset + len(data)] = torch.frombuffer(data, dtype=torch.uint8)
                offset += len(data)
        if offset != flat.numel():
            raise CheckpointError(f"tensor {name}: its chunks hold {offset} bytes, its shape {shape} needs "
                                  f"{flat.numel()}")
        return tensor

    # ---- checkpoints (the weight writer and reader of peer_model.checkpoint) ---------------------------

    def weight_writer(self, stats: WriteStats):
        """A ``write_weights`` for :func:`peer_model.checkpoint.save_checkpoint`: chunks, then the manifest."""

        def write(model: PEERTransformer, directory: Path) -> None:
            written: set[str] = set()
            tensors = {name: self.put_tensor(t, stats, written) for name, t in _unique_tensors(model).items()}
            self.files.sync_parents(written)  # the new chunks are durable before the manifest names them
            (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, "tensors": tensors}), encoding="utf-8")

        return write

    def read_weights(self, directory: Path, device: torch.device) -> dict[str, torch.Tensor]:
        """A ``read_weights`` for :func:`peer_model.checkpoint.load_checkpoint`; a directory without a manifest
        is a plain checkpoint (``model.safetensors``: versions written before chunking)."""
        if not (directory / MANIFEST).is_file():
            return load_file(str(directory / WEIGHTS), device=str(device))
        tensors = read_manifest(directory)["tensors"]
        return {name: self.get_tensor(name, entry).to(device) for name, entry in tensors.items()}


def read_manifest(directory: Path) -> dict:
    try:
        return parse_manifest((directory / MANIFEST).read_bytes(), directory / MANIFEST)
    except OSError as exc:
        raise CheckpointError(f"{directory / MANIFEST}: unreadable: {exc}") from exc


def parse_manifest(data: bytes, where: object) -> dict:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("tensors"), dict):
        raise CheckpointError(f"{where}: not a {FORMAT} manifest")
    return manifest


def chunks_named(manifest: dict) -> set[str]:
    return {digest for entry in manifest["tensors"].values() for digest in entry["chunks"]}


def manifest_chunks(directory: Path) -> set[str]:
    """The hashes a local checkpoint directory's manifest refers to (none for a plain checkpoint)."""
    if not (directory / MANIFEST).is_file():
        return set()
    return chunks_named(read_manifest(directory))
