"""Checkpoints: a directory with ``model.safetensors``, ``config.json`` and the model's tokenizer.

``config.json`` = ``{"format": 1, "model": ModelConfig.to_dict(), "pools": {layer: grid segments},
"extra": ...}``: enough to rebuild the model, grown pools included, before loading the weights.
``model.safetensors`` holds every parameter and persistent buffer (BatchNorm running statistics); the
tied output projection is stored once, as ``embed.weight``. Loading builds the model on the meta device
and assigns the stored tensors, so the peak memory is one copy of the weights (not a randomly
initialised model plus the file). Non-persistent buffers (RoPE tables, the
``trainable`` mask, usage counters) are not saved: a loaded model has every expert trainable. The
tokenizer writes its own files (``tokenizer.json`` and its configs for a Hugging Face one, nothing for
bytes) and comes back by :func:`~peer_model.tokenizer.load_tokenizer`.

Saving is crash-safe for one writer: the files are written and fsynced in a temporary directory
beside the target, which then takes the target's place by ``os.replace``. Overwriting an existing
checkpoint moves the old one aside first (``.<name>.old``) and deletes it once the new one is in
place; a crash between the two renames leaves the old checkpoint there, and readers fall back to it.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from .config import ModelConfig
from .expert_shards import expert_tables
from .model import PEERTransformer
from .pool import ExpertGrid
from .tokenizer import load_tokenizer

FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupt or does not match its config."""


WeightWriter = Callable[[PEERTransformer, Path], None]  # (model, directory) → the weight files written there
WeightReader = Callable[[Path, torch.device], dict[str, torch.Tensor]]  # (directory, device) → the state dict


def save_checkpoint(model: PEERTransformer, path: str | os.PathLike[str], extra: dict | None = None,
                    write_weights: WeightWriter | None = None) -> None:
    """``write_weights`` replaces ``model.safetensors`` by other weight files (the service's chunk manifest);
    the config, the tokenizer, fsync and the atomic swap stay the same."""
    path = Path(path)
    meta = {
        "format": FORMAT,
        "model": model.config.to_dict(),
        "pools": {str(i): layer.grid.to_list() for i, layer in model.peer_layers().items()},
        "extra": extra,
    }
    text = json.dumps(meta, indent=2)  # fails here, before any file is written, if extra is not JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        (write_weights or _write_safetensors)(model, tmp)
        (tmp / CONFIG).write_text(text, encoding="utf-8")
        model.tokenizer.save(tmp)
        _fsync(*sorted(tmp.iterdir()), tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                    read_weights: WeightReader | None = None,
                    parallelize: Callable[[PEERTransformer], object] | None = None) -> PEERTransformer:
    """Rebuild the model (grown pools included) on ``device`` with its tokenizer and load its weights there,
    in eval mode. ``read_weights`` reads the state written by a ``save_checkpoint`` ``write_weights``.
    ``parallelize`` is applied to the model on the meta device before the weights are read (e.g.
    ``shard_peer_layers``: this process then reads only its columns of the expert tables); expert tables
    written per shard (peer_model/expert_shards.py) load on any number of processes."""
    root = _resolve(Path(path))
    meta = _read_meta(root)
    try:
        config = ModelConfig.from_dict(meta["model"])
        grids = {int(i): ExpertGrid.from_list(segments) for i, segments in meta["pools"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{root / CONFIG}: invalid model or pool description: {exc}") from exc
    device = torch.device(device)
    with torch.device("meta"):  # no memory and no random init: the weights are assigned below
        model = PEERTransformer(config, grids)
    if parallelize is not None:
        parallelize(model)
    try:
        state = expert_tables(root, model, (read_weights or _read_safetensors)(root, device), device)
        if device.type == "cpu":  # a bf16 checkpoint trained on a GPU: the CPU expert kernels compute in fp32
            state = {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{root / WEIGHTS}: cannot load the weights: {exc}") from exc
    if config.tie_embeddings:  # stored once, as embed.weight; assign replaced that parameter
        model.lm_head.weight = model.embed.weight
        missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{root / WEIGHTS}: does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.init_buffers(device)
    model.restore_trainable()
    try:
        model.tokenizer = load_tokenizer(root)
    except ValueError as exc:
        raise CheckpointError(f"{root}: cannot load the tokenizer: {exc}") from exc
    return model.eval()


def _write_safetensors(model: PEERTransformer, directory: Path) -> None:
    save_model(model, str(directory / WEIGHTS))


def _read_safetensors(directory: Path, device: torch.device) -> dict[str, torch.Tensor]:
    return load_file(str(directory / WEIGHTS), device=str(device))


def read_checkpoint_meta(path: str | os.PathLike[str]) -> dict:
    """The content of ``config.json``: format, model config, pools, extra."""
    return _read_meta(_resolve(Path(path)))


def _read_meta(root: Path) -> dict:
    try:
        meta = json.loads((root / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{root / CONFIG}: unreadable: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{root / CONFIG}: not a format-{FORMAT} checkpoint config")
    missing = {"model", "pools", "extra"} - set(meta)
    if missing:
        raise CheckpointError(f"{root / CONFIG}: missing {sorted(missing)}")
    return meta


def _backup(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _resolve(path: Path) -> Path:
    """The directory holding the checkpoint: ``path``, or its backup if a save crashed mid-swap."""
    for candidate in (path, _backup(path)):
        if (candidate / CONFIG).is_file():
            return candidate
    raise CheckpointError(f"no checkpoint at {path}")


def _move_into_place(new: Path, path: Path) -> None:
    backup = _backup(path)
    if path.exists():
        shutil.rmtree(backup, ignore_errors=True)  # left over by an earlier save; path is complete
        os.replace(path, backup)
    os.replace(new, path)
    shutil.rmtree(backup, ignore_errors=True)


def _fsync(*paths: Path) -> None:
    """Flush files (and directory entries) to disk, so a power loss cannot leave them half written."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
