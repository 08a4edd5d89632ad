"""Expert tables sharded by columns over gloo processes (CPU): the same outputs, gradients, optimizer steps and
growth as the unsharded layer; data-parallel training equal to one process on the global batch; checkpoints
written on 2 processes load on 1 and on 4."""
from __future__ import annotations

import copy
import multiprocessing
from dataclasses import replace
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from peer_model.checkpoint import load_checkpoint, save_checkpoint
from peer_model.config import ModelConfig, PEERConfig
from peer_model.continual import ContinualOptions, continual_stage
from peer_model.dynamic_k import DynamicK
from peer_model.distributed import (
    ColumnShards, DataParallel, load_sharded_checkpoint, save_sharded_checkpoint, shard_peer_layers,
)
from peer_model.model import PEERTransformer
from peer_model.optim import SparseRowAdam
from peer_model.peer import PEER
from peer_model.train import TokenData, TrainConfig, build_optimizers, train

pytestmark = pytest.mark.timeout(120)

D = 26  # not a multiple of 4: the column ranges differ in width
TOL = dict(atol=1e-5, rtol=1e-5)


def run_processes(tmp_path, size: int, fn, *args) -> None:
    """``fn(shards, *args)`` on ``size`` gloo processes; an assertion failing in any of them fails the test.

    The processes are forked from a fork server that has imported this module (and torch) once: starting
    them costs no import, where spawning paid ~4 s of CPU per process on this project's 2 cores. The fork
    server itself is a fresh process (no threads, no process group), which is what makes forking it safe."""
    store = tmp_path / f"store-{size}-{fn.__name__}"
    mp.start_processes(_process, args=(size, str(store), fn, args), nprocs=size, start_method="forkserver")


multiprocessing.set_forkserver_preload([__name__])


def _process(rank, size, store, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=60))
    try:
        fn(ColumnShards(), *args)
    finally:
        dist.destroy_process_group()


def dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


# ---- the layer -----------------------------------------------------------------------------------


def _inputs(size, seed):
    """Every process' tokens (different counts) and targets, the same on every process."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(5 + 2 * r, D, generator=generator), torch.randn(5 + 2 * r, D, generator=generator))
            for r in range(size)]


def _assert_same_step(shards, layer, reference, seed):
    """One forward/backward of every process' tokens: the shard's output, its columns of the table
    gradients and the summed replicated gradients equal the unsharded layer's."""
    start, stop = shards.columns(D)
    batches = _inputs(shards.size, seed)
    layer.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    x, target = batches[shards.rank]
    out = layer(x)
    ((out - target) ** 2).sum().backward()
    for r, (x_r, target_r) in enumerate(batches):
        expected = reference(x_r)
        ((expected - target_r) ** 2).sum().backward()
        if r == shards.rank:
            torch.testing.assert_close(out, expected, **TOL)
    for (name, mine), (_, full) in zip(layer.named_parameters(), reference.named_parameters()):
        if name in ("expert_down", "expert_up"):
            torch.testing.assert_close(dense(mine.grad), dense(full.grad)[:, start:stop], **TOL, msg=name)
        else:
            summed = shards.all_reduce_(mine.grad.clone())
            torch.testing.assert_close(summed, full.grad, **TOL, msg=name)


def check_layer(shards):
    torch.manual_seed(0)
    reference = PEER(D, PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16))
    layer = copy.deepcopy(reference)
    shard_peer_layers(layer, shards)
    start, stop = shards.columns(D)
    assert layer.expert_down.shape == (16 * 16, stop - start)
    _assert_same_step(shards, layer, reference, seed=1)

    # one optimizer step: each shard's rows move as the unsharded table's columns (row-wise second moment
    # over all columns)
    steps = [SparseRowAdam([layer.expert_down, layer.expert_up], lr=1e-2),
             SparseRowAdam([reference.expert_down, reference.expert_up], lr=1e-2)]
    for optimizer in steps:
        optimizer.step()
    for mine, full in ((layer.expert_down, reference.expert_down), (layer.expert_up, reference.expert_up)):
        torch.testing.assert_close(mine.detach(), full.detach()[:, start:stop], **TOL)

    # growth: the same new rows as the unsharded layer's, function-preserving, then the same step again
    x = _inputs(shards.size, 2)[shards.rank][0]
    layer.eval(), reference.eval()
    with torch.no_grad():
        before = layer(x)
    for module in (layer, reference):
        torch.manual_seed(3)
        module.grow(150, tag="a")
        module.grow(rows=module.grid.rows, cols=module.grid.cols + 3, tag="cols only")
    torch.testing.assert_close(layer.expert_down.detach(), reference.expert_down.detach()[:, start:stop], **TOL)
    assert layer.expert_up[16 * 16:].abs().sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)
    generator = torch.Generator().manual_seed(4)
    new_up = torch.randn(reference.num_experts - 16 * 16, D, generator=generator) * 0.1
    with torch.no_grad():
        reference.expert_up[16 * 16:] = new_up
        layer.expert_up[16 * 16:] = new_up[:, start:stop]
    for module in (layer, reference):
        module.set_segment_status(1, "active")
        module.set_segment_status(2, "active")
        module.train()
    _assert_same_step(shards, layer, reference, seed=5)
    ids = layer.route(x)[1]
    assert bool((ids >= 16 * 16).any()), "the grown experts must be selected"
    twin = copy.deepcopy(layer)  # e.g. a distillation teacher: sharded over the same processes
    assert twin.shards is shards and twin.expert_down.column_shards is shards
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), atol=0, rtol=0)


# ---- data-parallel training and checkpoints ------------------------------------------------------

CONFIG = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32, peer_layers=[1],
                     peer=PEERConfig(num_experts=16 * 16, heads=2, top_k=4, d_key=16, query_batchnorm=False))
DATA = TokenData.from_text("the cat sees the moon. a dog likes some bread. " * 40)
TOKENS = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))


def _model() -> PEERTransformer:
    torch.manual_seed(0)
    model = PEERTransformer(CONFIG)
    model.grow(60, tag="grown")
    return model


def _train_cfg() -> TrainConfig:
    return TrainConfig(steps=3, batch_size=4, seq_len=16, warmup_steps=1, log_every=1, eval_every=10,
                       device="cpu", grad_clip=0.5)


def logits(model):
    with torch.no_grad():
        return model.eval()(TOKENS)


def train_and_save(shards, path):
    """Three data-parallel steps equal three steps of one process on the global batch; then a sharded save."""
    model = _model()
    single = copy.deepcopy(model)
    shard_peer_layers(model, shards)
    parallel = DataParallel(model, shards)
    history = train(model, parallel.batches(DATA), None, _train_cfg(), parallel=parallel).history
    expected = train(single, DATA, None, _train_cfg()).history
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in expected], abs=1e-5)
    assert [r["grad_norm"] for r in history] == pytest.approx([r["grad_norm"] for r in expected], abs=1e-5)
    torch.testing.assert_close(logits(model), logits(single), **TOL)
    save_sharded_checkpoint(model, path, shards, extra={"processes": shards.size})
    if shards.rank == 0:
        torch.save(logits(single), f"{path}.logits")


def load_and_resave(shards, path, again):
    model = load_sharded_checkpoint(path, shards)
    start, stop = shards.columns(CONFIG.d_model)
    assert model.peer_layers()[1].expert_down.shape[1] == stop - start
    torch.testing.assert_close(logits(model), torch.load(f"{path}.logits"), **TOL)
    build_optimizers(model, _train_cfg())  # the loaded shards train: tagged as shards for the optimizer
    assert getattr(model.peer_layers()[1].expert_up, "column_shards", None) is shards
    save_sharded_checkpoint(model, again, shards)


NEW_DATA = TokenData.from_text("def f(x):\n    return x + 1\n\nprint(f(2))\n" * 40)
STAGES = {  # the service's default (replay, distillation, growth) with a routing review and data-keyed sub-keys;
    # per-batch sparse fine-tuning (its expert selection counts every process' tokens); replay of generated text
    "replay": ContinualOptions("replay", new_experts=40, replay_fraction=0.5, distill_weight=1.0, review_steps=2,
                               key_init="data", usage_batches=2, train=_train_cfg()),
    "sparse": ContinualOptions("sparse_finetune", sparse_top_experts=8, usage_batches=2, train=_train_cfg()),
    # the earlier text gone: the sharded parent generates what is replayed, the same windows on every process
    "generated": ContinualOptions("replay", new_experts=20, replay_fraction=0.5, replay_source="parent",
                                  generated_windows=4, train=_train_cfg()),
}


def stage_equals_one_process(shards, name):
    """A continual stage on sharded processes gives the child one process gives on the same global batches."""
    parent = _model()
    torch.manual_seed(7)
    expected = continual_stage(parent, NEW_DATA, [DATA], STAGES[name], tag="new")
    sharded = copy.deepcopy(parent)
    shard_peer_layers(sharded, shards)
    torch.manual_seed(7)
    stage = continual_stage(sharded, NEW_DATA, [DATA], STAGES[name], tag="new", shards=shards)
    losses = [r["loss"] for r in stage.train_result.history]
    assert losses == pytest.approx([r["loss"] for r in expected.train_result.history], abs=1e-5), name
    torch.testing.assert_close(logits(stage.child), logits(expected.child), **TOL, msg=name)
    assert name != "sparse" or all(len(t) for t in expected.trained_experts.values())
    assert {i: t.tolist() for i, t in stage.trained_experts.items()} == {
        i: t.tolist() for i, t in expected.trained_experts.items()}, name


def variants_train_sharded(shards):
    """MH-MoE's head slices (experts d / heads wide) train sharded as on one process; DA-MoE's running scale is
    averaged over the processes like BatchNorm's statistics, so the replicas stay equal (its calibration on
    the batch sees each process' rows, so this run is not one process')."""
    for name, option in (("head_slices", dict(head_slices=True)), ("dynamic_k", dict(dynamic_k=True))):
        torch.manual_seed(0)
        model = PEERTransformer(replace(CONFIG, peer=replace(CONFIG.peer, **option)))
        single = copy.deepcopy(model)
        shard_peer_layers(model, shards)
        parallel = DataParallel(model, shards)
        history = train(model, parallel.batches(DATA), None, _train_cfg(), parallel=parallel).history
        if name == "head_slices":
            expected = train(single, DATA, None, _train_cfg()).history
            assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in expected], abs=1e-5)
            torch.testing.assert_close(logits(model), logits(single), **TOL)
        scales = [module.scale for module in model.modules() if isinstance(module, DynamicK)]
        assert bool(scales) == (name == "dynamic_k")
        replicated = [t for t in model.parameters() if getattr(t, "column_shards", None) is None] + scales
        mine = torch.cat([t.detach().float().reshape(-1) for t in replicated])
        everyone = [torch.empty_like(mine) for _ in range(shards.size)]
        dist.all_gather(everyone, mine)
        assert all(torch.equal(theirs, mine) for theirs in everyone), name


# ---- the tests: one group of processes per size (starting processes is what takes time here) ----------


def on_two_processes(shards, root):
    check_layer(shards)
    train_and_save(shards, f"{root}/on2")
    load_and_resave(shards, f"{root}/one", f"{root}/one-on2")  # an unsharded checkpoint loads sharded
    for name in STAGES:
        stage_equals_one_process(shards, name)
    variants_train_sharded(shards)


def on_four_processes(shards, root):
    check_layer(shards)
    load_and_resave(shards, f"{root}/on2", f"{root}/on4")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    model = _model()
    save_checkpoint(model, root / "one")
    torch.save(logits(model), f"{root / 'one'}.logits")
    run_processes(root, 2, on_two_processes, str(root))
    return root


def test_on_2_processes_layer_training_and_checkpoints_equal_one_process(root):
    """Layer outputs, gradients, optimizer step and growth; three training steps; a sharded save; an
    unsharded checkpoint loaded on 2 processes and saved again (asserted in the processes)."""
    assert sorted(p.name for p in (root / "on2").iterdir() if p.name.startswith("experts")) == [
        "experts-00000-of-00002.safetensors", "experts-00001-of-00002.safetensors"]
    torch.testing.assert_close(logits(load_checkpoint(root / "one-on2")), torch.load(f"{root / 'one'}.logits"), **TOL)


def test_a_checkpoint_saved_on_2_processes_loads_on_1(root):
    loaded = load_checkpoint(root / "on2")
    torch.testing.assert_close(logits(loaded), torch.load(f"{root / 'on2'}.logits"), **TOL)
    assert [s.tag for s in loaded.peer_layers()[1].segments] == ["initial", "grown"]


def test_on_4_processes_the_layer_equals_and_the_2_process_checkpoint_loads(root):
    run_processes(root, 4, on_four_processes, str(root))
    torch.testing.assert_close(logits(load_checkpoint(root / "on4")), torch.load(f"{root / 'on2'}.logits"), **TOL)


def test_peer_train_nproc_runs_itself_under_torchrun(monkeypatch):
    """`peer train --nproc N` starts torchrun with the same arguments but --nproc (torchrun would take it for
    its own --nproc-per-node); each process it starts finds torchrun's environment instead."""
    from types import SimpleNamespace

    from peer_model import cli
    from peer_model.distributed import launch

    commands = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(launch.subprocess, "run",
                        lambda command, check: commands.append(command) or SimpleNamespace(returncode=0))
    argv = ["train", "--text-file", "t.txt", "--nproc", "2", "--steps", "3", "--out", "runs/x"]
    assert cli.main(argv) == 0
    assert commands[0][1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                               "peer_model.cli", "train", "--text-file", "t.txt", "--steps", "3", "--out", "runs/x"]
    monkeypatch.setattr(launch.subprocess, "run", lambda command, check: SimpleNamespace(returncode=1))
    assert cli.main(argv) == 2  # a failed process fails the command
