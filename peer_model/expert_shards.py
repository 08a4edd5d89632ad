"""Where a checkpoint keeps its expert tables, and reading the columns of them a model holds.

A checkpoint written by one process holds every tensor in its weights (``model.safetensors``). One
written by R processes whose expert tables are split by columns (peer_model/distributed) keeps every
process' columns in a file of its own, listed in ``expert_shards.json``::

    {"layout": "columns", "shards": [{"file": "experts-00000-of-00002.safetensors", "columns": [0, 96]},
                                     {"file": "experts-00001-of-00002.safetensors", "columns": [96, 192]}]}

and everything else in the weights. Both load on any number of processes: a model whose tables hold
columns ``[a, b)`` (all of them, or its shard) reads only those columns from the shard files (safetensors
reads slices without loading the rest of a tensor), so resharding from R to R' processes never needs one
process to hold a whole table. From an unsharded checkpoint each process reads the whole tables and
keeps its columns.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .peer import PEER

MANIFEST = "expert_shards.json"
TABLES = ("expert_down", "expert_up")


def shard_file(rank: int, size: int) -> str:
    return f"experts-{rank:05d}-of-{size:05d}.safetensors"


def expert_table_columns(model: nn.Module) -> dict[str, tuple[int, int]]:
    """State-dict key of every PEER expert table → the columns ``[start, stop)`` the model holds of it:
    all of them, unless its layer is sharded (then ``layer.shards`` says which)."""
    columns = {}
    for name, module in model.named_modules():
        if isinstance(module, PEER):
            shards = getattr(module, "shards", None)
            span = (0, module.expert_down.shape[1]) if shards is None else shards.columns(module.expert_width)
            columns.update({f"{name}.{table}" if name else table: span for table in TABLES})
    return columns


def write_manifest(directory: Path, columns: list[tuple[int, int]]) -> None:
    """``expert_shards.json`` for shard files 0..len(columns) - 1 holding those column ranges."""
    shards = [{"file": shard_file(rank, len(columns)), "columns": list(span)} for rank, span in enumerate(columns)]
    (directory / MANIFEST).write_text(json.dumps({"layout": "columns", "shards": shards}, indent=2), encoding="utf-8")


def expert_tables(root: Path, model: nn.Module, state: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """``state`` (read from the checkpoint's weights) with every expert table of ``model`` as wide as
    ``model`` holds it: cut to its columns when ``state`` has the whole table, otherwise read from the
    shard files of ``expert_shards.json``. A checkpoint without shards and an unsharded model: ``state``."""
    wanted = expert_table_columns(model)
    shards = _read_manifest(root)
    out = dict(state)
    for key, (start, stop) in wanted.items():
        if key in state:
            table = state[key]
            out[key] = table if (start, stop) == (0, table.shape[1]) else table[:, start:stop].contiguous()
        elif shards:
            out[key] = _read_columns(root, shards, key, start, stop, device)
    return out


def _read_manifest(root: Path) -> list[dict]:
    path = root / MANIFEST
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))["shards"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RuntimeError(f"{path}: unreadable: {exc}") from exc


def _read_columns(root: Path, shards: list[dict], key: str, start: int, stop: int,
                  device: torch.device) -> torch.Tensor:
    """Columns ``[start, stop)`` of table ``key`` from the shard files that hold them."""
    parts, covered = [], start
    for shard in sorted(shards, key=lambda s: s["columns"][0]):
        first, last = shard["columns"]
        lo, hi = max(covered, first), min(stop, last)
        if lo >= hi:
            continue
        if lo != covered:
            break
        with safe_open(str(root / shard["file"]), framework="pt", device=str(device)) as f:
            whole = (lo, hi) == (first, last)
            parts.append(f.get_tensor(key) if whole else f.get_slice(key)[:, lo - first : hi - first])
        covered = hi
    if covered != stop:
        raise RuntimeError(f"{key}: the shard files hold columns [{start}, {covered}) of [{start}, {stop})")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
