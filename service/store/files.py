"""Where the store's bytes live: a local directory (:class:`LocalFiles`, the default) or an object store
reached through fsspec (:class:`ObjectFiles`: ``s3://bucket/prefix`` on any S3-compatible service, or any
other fsspec URL). :class:`service.store.store.Store` and :class:`service.store.chunks.ChunkStore` speak only to
this interface; keys are ``/``-separated paths relative to the root (``chunks/ab/ab12...``).

How each keeps a reader (or a crash) from seeing half of anything:

- Local: a file is written to a temporary name, fsynced and renamed into place, and its directory is fsynced
  after the rename (else a power loss can lose the rename: a committed corpus or version row would name a missing
  file, and garbage collection would take the orphaned temporary one); a checkpoint directory is installed by
  peer_model's atomic swap, and the directory it lands in fsynced after; garbage collection moves a chunk aside
  before deleting it, so a writer that reuses it meanwhile either renews it first (it is put back) or writes it
  again.
- Object store: there is no rename, but one PUT is atomic per object. Every object is written once, whole
  (chunks under their hash, corpus parts, a checkpoint's files under a key unique to its attempt), and a
  checkpoint's ``manifest.json`` goes last: a checkpoint without one is incomplete, and is not there for
  :meth:`has_checkpoint` or a load. Reusing a chunk renews its modification time by copying it onto itself
  on the server (no bytes travel). Garbage collection reads a chunk's time again just before deleting it;
  what remains is the window between that read and the DELETE (milliseconds), which a rename closes locally
  and S3 offers nothing to close.

Tensors never go through a local file on an object store: chunks are PUT from memory and read into the
tensor, PEER_STORE_CONCURRENCY of them in flight at once (one request's latency per group, not per chunk). The config, tokenizer and manifest files of a checkpoint (small) pass through a temporary directory,
because peer_model writes and reads them there.
"""
from __future__ import annotations

import errno
import functools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import torch

from peer_model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from peer_model.model import PEERTransformer

from ..settings import is_local

MANIFEST = "manifest.json"  # a chunked checkpoint's last file (service/store/chunks.py)


def open_files(root: str | os.PathLike[str], options: dict | None = None,
               concurrency: int = 16) -> "LocalFiles | ObjectFiles":
    if is_local(root):
        return LocalFiles(Path(str(root).removeprefix("file://")))
    return ObjectFiles(str(root), options or {}, concurrency)


class LocalFiles:
    parallel = 1  # chunks are read and written one after the other

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def map(fn: Callable, items: Iterable) -> Iterable:
        return map(fn, items)

    def path(self, key: str) -> Path:
        return self.root / key

    # ---- objects -------------------------------------------------------------------------------

    def write(self, key: str, data: bytes, sync_directory: bool = True) -> None:
        """``data`` under ``key``, durable once this returns; ``sync_directory`` False leaves the directory's fsync
        to the caller (:meth:`sync_parents`, once for many files: a checkpoint's chunks)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if sync_directory:
            _sync_directory(path.parent)

    def read(self, key: str) -> bytearray:
        with open(self.path(key), "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(data)
        return data

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def renew(self, key: str) -> bool:
        """Mark the object as in use now (young for garbage collection's grace period); False if it is gone."""
        try:
            os.utime(self.path(key))
            return True
        except FileNotFoundError:
            return False

    def sync_parents(self, keys: Iterable[str]) -> None:
        """The directory entries of new files reach the disk (before a manifest that names them does)."""
        for folder in {self.path(key).parent for key in keys}:
            _sync_directory(folder)

    # ---- walking (garbage collection) ------------------------------------------------------------

    def children(self, key: str) -> list[str]:
        folder = self.path(key)
        return sorted(child.name for child in folder.iterdir()) if folder.is_dir() else []

    def file_ages(self, key: str) -> dict[str, float]:
        """{name: modification time} of the files directly under ``key`` (one listing)."""
        folder = self.path(key)
        if not folder.is_dir():
            return {}
        return {child.name: child.stat().st_mtime for child in sorted(folder.iterdir()) if child.is_file()}

    def age(self, key: str) -> float:
        """The newest modification time of the object, or of a directory and its entries (a checkpoint is
        written inside, then renamed into place)."""
        path = self.path(key)
        times = [path.stat().st_mtime]
        if path.is_dir():
            times += [child.stat().st_mtime for child in path.iterdir()]
        return max(times)

    def size(self, key: str) -> int:
        path = self.path(key)
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def remove(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def collect(self, key: str, cutoff: float) -> None:
        """Remove an object judged garbage unless a writer renewed it since: it is moved aside first, so a
        writer either renews it before the move (then it is put back) or finds it gone and writes it again."""
        path = self.path(key)
        aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.gc")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return
        if aside.stat().st_mtime >= cutoff:
            os.replace(aside, path)
        else:
            aside.unlink(missing_ok=True)

    # ---- checkpoints -----------------------------------------------------------------------------

    def has_checkpoint(self, key: str) -> bool:
        return self.exists(key)

    def save_checkpoint(self, key: str, model: PEERTransformer, extra: dict | None,
                        write_weights: Callable) -> None:
        save_checkpoint(model, self.path(key), extra, write_weights=write_weights)
        _sync_directory(self.path(key).parent)  # the rename into place is durable before a row names it

    def load_checkpoint(self, key: str, device: str, read_weights: Callable) -> PEERTransformer:
        return load_checkpoint(self.path(key), device, read_weights=read_weights)


def _sync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Reported:
    """An fsspec filesystem whose failures are all OSErrors: s3fs turns S3's answers into them, but an
    unreachable endpoint raises botocore's or aiohttp's own errors, which the service would report as a 500
    where a full disk is a 507 (service/jobs/uploads.py) and a job failure with the reason."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self._fs = fs

    def __getattr__(self, name: str):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - a transport failure: the store is unreachable
                raise OSError(errno.EIO, f"the object store failed: {type(exc).__name__}: {exc}") from exc

        return call


class ObjectFiles:
    """An fsspec filesystem under ``url``. ``options`` go to it as keyword arguments (s3fs: ``endpoint_url``,
    ``key``, ``secret``, ``client_kwargs``...); without them s3fs takes the standard ``AWS_*`` variables."""

    def __init__(self, url: str, options: dict, concurrency: int):
        self.root = url.rstrip("/")
        self.protocol = fsspec.utils.get_protocol(url)
        self.options = {"use_listings_cache": False, **options}  # other processes write: never list from a cache
        if self.protocol in ("s3", "s3a"):  # botocore's pool holds 10 connections: room for every chunk in flight
            config = {"max_pool_connections": concurrency, **self.options.get("config_kwargs", {})}
            self.options["config_kwargs"] = config
        self.base = fsspec.get_filesystem_class(self.protocol)._strip_protocol(url).rstrip("/")  # no client yet
        self.parallel = concurrency  # chunks in flight at once: one request's latency per group, not per chunk
        self._fs, self._pool, self._pid = None, None, None

    @property
    def fs(self) -> _Reported:
        """The filesystem of this process: an async one (s3fs) is not fork-safe, so a forked worker makes its own."""
        self._own()
        return self._fs

    def map(self, fn: Callable, items: Iterable) -> list:
        """``fn`` over ``items`` with up to ``parallel`` calls (requests) at once, results in order."""
        self._own()
        return list(self._pool.map(fn, items))

    def _own(self) -> None:
        if self._pid != os.getpid():
            self._fs = _Reported(fsspec.filesystem(self.protocol, skip_instance_cache=True, **self.options))
            self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="peer-store")
            self._pid = os.getpid()

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def _objects(self, key: str) -> dict[str, dict]:
        """The object at ``key``, or every object under the prefix ``key/``: {path: info}."""
        try:
            return self.fs.find(self._path(key), detail=True)
        except FileNotFoundError:
            return {}

    def _mtime(self, info: dict) -> float:
        """An object's modification time from its listing (S3: LastModified), else fsspec's ``modified``."""
        stamp = info.get("LastModified") or self.fs.modified(info["name"])
        return stamp.timestamp()

    # ---- objects -------------------------------------------------------------------------------

    def write(self, key: str, data: bytes, sync_directory: bool = True) -> None:
        """One PUT: durable once it returns (``sync_directory`` means nothing to an object store)."""
        self.fs.pipe_file(self._path(key), bytes(data))

    def read(self, key: str) -> bytearray:
        return bytearray(self.fs.cat_file(self._path(key)))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def renew(self, key: str) -> bool:
        """Renew the object's modification time: on S3 a server-side copy onto itself (no bytes travel),
        elsewhere the object is written again (its content is its name: the same bytes)."""
        path = self._path(key)
        try:
            if self.protocol in ("s3", "s3a"):
                bucket, name, _ = self.fs.split_path(path)
                self.fs.call_s3("copy_object", Bucket=bucket, Key=name, CopySource={"Bucket": bucket, "Key": name},
                                MetadataDirective="REPLACE")
            else:
                self.fs.pipe_file(path, self.fs.cat_file(path))
            return True
        except FileNotFoundError:
            return False

    def sync_parents(self, keys: Iterable[str]) -> None:
        """Nothing to do: an object is durable once its PUT returned."""

    # ---- walking (garbage collection) ------------------------------------------------------------

    def children(self, key: str) -> list[str]:
        try:
            return sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self._path(key), detail=False))
        except FileNotFoundError:
            return []

    def file_ages(self, key: str) -> dict[str, float]:
        try:
            listing = self.fs.ls(self._path(key), detail=True)
        except FileNotFoundError:
            return {}
        return {info["name"].rsplit("/", 1)[-1]: self._mtime(info) for info in listing if info["type"] == "file"}

    def age(self, key: str) -> float:
        objects = self._objects(key)
        return max((self._mtime(info) for info in objects.values()), default=time.time())

    def size(self, key: str) -> int:
        return sum(int(info.get("size") or 0) for info in self._objects(key).values())

    def remove(self, key: str) -> None:
        paths = list(self._objects(key))
        if paths:
            self.fs.rm(paths)

    def collect(self, key: str, cutoff: float) -> None:
        """Delete the object unless it was renewed since it was judged garbage (its time is read again)."""
        try:
            if self._mtime(self.fs.info(self._path(key))) < cutoff:
                self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    # ---- checkpoints -----------------------------------------------------------------------------

    def has_checkpoint(self, key: str) -> bool:
        return self.exists(f"{key}/{MANIFEST}")

    def save_checkpoint(self, key: str, model: PEERTransformer, extra: dict | None,
                        write_weights: Callable) -> None:
        """peer_model writes the config and tokenizer files (and ``write_weights`` the manifest, after PUTting
        the chunks) into a temporary directory; they are uploaded from there, the manifest last."""
        with tempfile.TemporaryDirectory(prefix="peer-checkpoint-") as tmp:
            local = Path(tmp) / "checkpoint"
            save_checkpoint(model, local, extra, write_weights=write_weights)
            for file in sorted(local.iterdir(), key=lambda f: (f.name == MANIFEST, f.name)):
                self.fs.put_file(str(file), self._path(f"{key}/{file.name}"))

    def load_checkpoint(self, key: str, device: str, read_weights: Callable) -> PEERTransformer:
        """The checkpoint's files (config, tokenizer, manifest: no tensors) are fetched into a temporary
        directory; ``read_weights`` reads the chunks from the store."""
        with tempfile.TemporaryDirectory(prefix="peer-checkpoint-") as tmp:
            try:
                names = self.children(key)
                if MANIFEST not in names:
                    raise CheckpointError(f"no checkpoint at {self.root}/{key}")
                for name in names:
                    self.fs.get_file(self._path(f"{key}/{name}"), os.path.join(tmp, name))
            except OSError as exc:
                raise CheckpointError(f"{self.root}/{key}: cannot read the checkpoint: {exc}") from exc
            return load_checkpoint(tmp, torch.device(device), read_weights=read_weights)
