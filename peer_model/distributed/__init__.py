"""PEER expert tables sharded over a torch.distributed process group (column-wise), data parallelism for
the rest of the model, and checkpoints written per shard that load on any number of processes.

    shards = ColumnShards(group)                 # this process' columns of every expert table
    shard_peer_layers(model, shards)              # the model code does not change (peer_model/distributed/layer.py)
    parallel = DataParallel(model, shards)        # the dense part: gradients all-reduced, replicas kept equal
    train(model, parallel.batches(data), val, cfg, parallel=parallel)
    save_sharded_checkpoint(model, path, shards)  # loads on 1 process (load_checkpoint) or on any number
                                                  # (load_sharded_checkpoint)

Why columns and not rows: docs/scaling.md (bytes per step) and BENCHMARKS.md section 9 (measured).
"""
from .checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from .data_parallel import DataParallel
from .layer import ShardedPEER, shard_peer_layers
from .shards import ColumnShards, Traffic

__all__ = ["ColumnShards", "DataParallel", "ShardedPEER", "Traffic", "load_sharded_checkpoint",
           "save_sharded_checkpoint", "shard_peer_layers"]
