"""Checkpoints of a model whose expert tables are sharded: written per shard, loaded on any number of processes.

The directory is an ordinary checkpoint (config.json, tokenizer, ``model.safetensors`` with every
replicated tensor) plus one ``experts-RRRRR-of-SSSSS.safetensors`` per process with its columns of every
expert table and ``expert_shards.json`` listing them (peer_model/expert_shards.py). It loads with
:func:`peer_model.checkpoint.load_checkpoint` on one process (the tables put back together) and with
:func:`load_sharded_checkpoint` on any number, each process reading only its own columns.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from ..expert_shards import expert_table_columns, shard_file, write_manifest
from ..model import PEERTransformer
from .layer import shard_peer_layers
from .shards import ColumnShards


def save_sharded_checkpoint(model: PEERTransformer, path: str | os.PathLike[str], shards: ColumnShards,
                            extra: dict | None = None) -> None:
    """Every process of ``shards.group`` calls it, with its shard of the same model.

    Process 0 writes the checkpoint through :func:`~peer_model.checkpoint.save_checkpoint` (a temporary
    directory moved into place once complete, so a crash leaves the previous checkpoint); the others write
    their shard files into that temporary directory first. ``path`` must be on a file system every process
    sees. The replicas' tensors (equal on every process, see data_parallel.py) are written by process 0.
    """
    columns = expert_table_columns(model)
    widths = {layer.expert_width for layer in model.modules() if hasattr(layer, "expert_width")}
    if len(widths) != 1:
        raise ValueError(f"a sharded checkpoint needs one expert table width, got {sorted(widths)}")
    width = widths.pop()
    state = model.state_dict()
    mine = {key: state[key].contiguous() for key in columns}
    if shards.rank != 0:
        directory = _share_directory(shards, None)
        save_file(mine, str(directory / shard_file(shards.rank, shards.size)))
        dist.barrier(group=shards.group)  # every shard is written
    else:
        def write_weights(_model: PEERTransformer, directory: Path) -> None:
            _share_directory(shards, directory)
            save_file(_first_names({k: v for k, v in state.items() if k not in columns}), str(directory / WEIGHTS))
            save_file(mine, str(directory / shard_file(0, shards.size)))
            write_manifest(directory, [shards.columns(width, rank) for rank in range(shards.size)])
            dist.barrier(group=shards.group)  # every shard is written

        save_checkpoint(model, path, extra, write_weights=write_weights)
    dist.barrier(group=shards.group)  # the checkpoint is in place


def load_sharded_checkpoint(path: str | os.PathLike[str], shards: ColumnShards,
                            device: str | torch.device = "cpu") -> PEERTransformer:
    """Any checkpoint (written by any number of processes, or by one) with this process' columns of
    the expert tables, in eval mode: :func:`shard_peer_layers` applied on the meta device, then only those
    columns read."""
    return load_checkpoint(path, device, parallelize=lambda model: shard_peer_layers(model, shards))


def _share_directory(shards: ColumnShards, directory: Path | None) -> Path:
    """Process 0's temporary checkpoint directory, sent to every process."""
    message = [None if directory is None else str(directory)]
    source = 0 if shards.group is None else dist.get_global_rank(shards.group, 0)
    dist.broadcast_object_list(message, src=source, group=shards.group)
    return Path(message[0])


def _first_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the later names of a tensor stored under several (the tied output projection is
    ``embed.weight``, as checkpoint.save_checkpoint stores it)."""
    seen, kept = set(), {}
    for key, tensor in state.items():
        if tensor.numel() == 0 or tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            kept[key] = tensor
    return kept
