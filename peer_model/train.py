"""Training loop, data windows and evaluation in bits per byte.

One step: sample ``batch_size`` random windows of ``seq_len`` tokens, next-token cross-entropy,
backward, clip the global gradient norm, set the learning rate (linear warm-up, cosine decay), step.

Two optimizers share the step (:class:`Optimizers`):

* dense ``AdamW`` for every ordinary parameter, peak ``lr``. Weight decay applies to the weight
  matrices of ``nn.Linear`` layers and batched expert matrices (3-D and more: MoE experts, SwitchHead's
  value and output experts) only; norms, BatchNorm, the (tied) byte embedding, PKM's value table and
  the product sub-keys are not decayed: they are scales, shifts or lookup vectors, and shrinking the
  sub-keys would only flatten the routing softmax;
* :class:`~peer_model.optim.SparseRowAdam` for the PEER expert tables, peak ``expert_lr``, no decay:
  their gradients hold only the rows the batch used, and only those rows are read or written.

Both follow the same warm-up + cosine multiplier.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import ModelConfig
from .head_loss import Head, head_loss
from .optim import SparseRowAdam, coalesced
from .parameterization import combine, lr_multipliers
from .peer import PEER
from .tokenizer import BOS, Tokenizer, window_start

if TYPE_CHECKING:
    from .distributed import DataParallel


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3  # dense AdamW peak
    expert_lr: float = 1e-3  # expert tables (SparseRowAdam) peak
    weight_decay: float = 0.1  # weight matrices only, see the module docstring
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the peak
    grad_clip: float = 1.0  # max global L2 norm; float("inf") never clips
    eval_every: int = 100
    eval_batches: int = 20
    seed: int = 0  # batch sampling
    device: str = "auto"  # "auto": cuda if available, else cpu
    log_every: int = 10
    track_usage: bool = False  # count expert selections (PEER.usage_counts) on training batches
    open_steps: int | None = None  # steps over which grown ("new") segments enter retrieval; None: warmup_steps
    param_dtype: str = "float32"  # or "bfloat16" (CUDA only): parameters in bf16, optimizer state in fp32
    loss_chunk_tokens: int = 1024  # the output layer and the loss take this many tokens at a time (0: all at once)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens must be >= 0, got {self.loss_chunk_tokens}")
        if self.open_steps is not None and self.open_steps < 0:
            raise ValueError(f"open_steps must be >= 0, got {self.open_steps}")
        for name in ("lr", "expert_lr", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype must be one of {', '.join(PARAM_DTYPES)}, got {self.param_dtype!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"invalid device {self.device!r}: {exc}") from None


PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter and BatchNorm statistic to ``dtype``; the RoPE tables and other derived
    buffers stay fp32 (rotations are computed in fp32). Tied parameters are one object: cast once."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.data = module.running_mean.data.to(dtype)
            module.running_var.data = module.running_var.data.to(dtype)


def place_model(model: nn.Module, cfg: TrainConfig) -> torch.device:
    """Move ``model`` to ``cfg``'s device and parameter dtype (before optimizers are built for it: they
    keep fp32 masters of bf16 parameters, on the parameters' device); returns the device."""
    device = resolve_device(cfg.device)
    dtype = PARAM_DTYPES[cfg.param_dtype]
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"param_dtype {cfg.param_dtype} needs CUDA: the CPU expert kernels compute in fp32")
    model.to(device)
    cast_parameters(model, dtype)
    return device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---- data ----------------------------------------------------------------------------------------


def id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest signed integer dtype that holds every id below ``vocab_size`` (int16 for bytes)."""
    return torch.int16 if vocab_size <= 2**15 else torch.int32


class TokenData:
    """A 1-D sequence of token ids of one tokenizer cut into windows.

    Every window is a fresh context that starts as the tokenizer starts one, exactly as generation does
    (:func:`~peer_model.tokenizer.context_ids`). With a ``bos`` (the tokenizer adds its BOS): inputs
    ``[BOS, w0 .. w(T-2)]``, targets ``[w0 .. w(T-1)]`` (a model trained on windows that start mid-text
    never sees BOS and reads it as noise at generation time). With ``bos`` None (the tokenizer adds none,
    as GPT-2's, Qwen's and SmolLM2's): inputs ``[w0 .. w(T-1)]``, targets ``[w1 .. wT]``, so the text's
    first token is never a target.
    ``bytes_per_token``: UTF-8 bytes of text per token, so that :func:`evaluate_bpb` reports bits per
    byte for any tokenizer (1 for bytes).
    """

    def __init__(self, tokens: torch.Tensor, bos: int | None = BOS, bytes_per_token: float = 1.0):
        if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"tokens must be a 1-D integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        if not bytes_per_token > 0:
            raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
        self.tokens = tokens
        self.bos = bos
        self.bytes_per_token = bytes_per_token

    @classmethod
    def from_text(cls, text: str, tokenizer: Tokenizer | None = None) -> "TokenData":
        """``text`` encoded by ``tokenizer``. Bytes (None or a byte tokenizer): the UTF-8 bytes, stored as
        uint8. Otherwise ``tokenizer.encode(text)`` as int32, with ``bytes_per_token`` this text's UTF-8
        bytes per token."""
        data = bytearray(text.encode("utf-8"))
        if tokenizer is None or tokenizer.kind == "byte":
            return cls(torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8))
        ids = tokenizer.encode(text)
        return cls(torch.tensor(ids, dtype=torch.int32), window_start(tokenizer), len(data) / len(ids) if ids else 1.0)

    def __len__(self) -> int:
        return self.tokens.numel()

    def bits_per_byte(self, nats: float, tokens: int) -> float:
        """``nats`` of next-token cross-entropy summed over ``tokens`` predicted tokens of this text, in bits per
        byte of its UTF-8 text (see :func:`evaluate_bpb`)."""
        return nats / tokens / math.log(2) / self.bytes_per_token

    def sample_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows of ``seq_len`` tokens at uniform random offsets: (inputs, targets),
        both (B, T) int64, inputs = targets shifted right by one (after BOS, or the text's previous token)."""
        span = seq_len + (self.bos is None)
        if len(self) < span:
            raise ValueError(f"{len(self)} tokens cannot fill a window of seq_len = {seq_len}")
        starts = torch.randint(0, len(self) - span + 1, (batch_size, 1), generator=generator)
        return _shifted(self.tokens[starts + torch.arange(span)].long(), self.bos)

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic windows from the start: window w predicts tokens ``w*T .. (w+1)*T - 1``, so
        every token is a target exactly once (without a BOS: tokens ``1 + w*T ..``, every token but the
        first, which has no context). Full windows come ``batch_size`` at a time; a shorter
        last window, if any, is a batch of its own. At most ``max_batches`` batches.
        """
        context = self.bos is None  # without a BOS, a window also reads the token before its first target
        n = len(self) - context
        for group in self._eval_starts(batch_size, seq_len)[:max_batches]:
            length = min(seq_len, n - group[0]) + context
            yield _shifted(self.tokens[torch.tensor(group).unsqueeze(1) + torch.arange(length)].long(), self.bos)

    def eval_batch_count(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> int:
        """How many batches :meth:`iter_eval_batches` gives."""
        return len(self._eval_starts(batch_size, seq_len)[:max_batches])

    def _eval_starts(self, batch_size: int, seq_len: int) -> list[list[int]]:
        n = len(self) - (self.bos is None)
        starts = list(range(0, n, seq_len))
        full = [s for s in starts if s + seq_len <= n]
        batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
        if len(full) < len(starts):
            batches.append(starts[len(full) :])  # the tail window, shorter than seq_len
        return batches


def _shifted(windows: torch.Tensor, bos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) windows → (inputs, targets): with a ``bos``, inputs = [bos, windows[:, :-1]] and targets the
    windows; without, inputs = windows[:, :-1] and targets = windows[:, 1:]."""
    if bos is None:
        return windows[:, :-1], windows[:, 1:]
    inputs = torch.cat([torch.full_like(windows[:, :1], bos), windows[:, :-1]], dim=1)
    return inputs, windows


# ---- optimizers ----------------------------------------------------------------------------------


class Optimizers:
    """Dense AdamW + SparseRowAdam on the expert tables, stepped and scheduled together.

    Dense parameters held in bf16 (``TrainConfig.param_dtype`` on GPU) are optimised through fp32
    master copies (``masters``: pairs of the model's parameter and its fp32 copy, which AdamW holds):
    each step copies the gradients up, steps the masters and rounds them back into the model, so AdamW's
    moments and the accumulated updates keep full precision. The expert tables need none: SparseRowAdam
    keeps fp32 state and computes every update in fp32 itself.

    ``row_rates``: pairs of a dense parameter that AdamW holds and a (rows,) tensor of per-row learning-rate
    multipliers. AdamW's step is linear in its rate (``p -= lr · (m̂ / (√v̂ + ε) + wd · p)``, its moments
    independent of the rate), so each step's update of those rows is scaled after AdamW took it: exactly
    a per-row rate.

    Built for a fixed set of parameters: rebuild after ``model.grow`` (it replaces the tables).
    """

    def __init__(self, dense: torch.optim.AdamW, experts: SparseRowAdam | None,
                 masters: Sequence[tuple[nn.Parameter, nn.Parameter]] = (),
                 row_rates: Sequence[tuple[nn.Parameter, torch.Tensor]] = ()):
        self.dense = dense
        self.experts = experts
        self.masters = list(masters)
        self.row_rates = [(param, rate.to(param.device, param.dtype).view(-1, *[1] * (param.dim() - 1)))
                          for param, rate in row_rates]
        self._all = [opt for opt in (dense, experts) if opt is not None]
        for opt in self._all:
            for group in opt.param_groups:
                group.setdefault("peak_lr", group["lr"])

    def zero_grad(self) -> None:
        for opt in self._all:
            opt.zero_grad(set_to_none=True)
        for param, _ in self.masters:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for param, master in self.masters:
            master.grad = None if param.grad is None else param.grad.float()
        before = [param.detach().clone() for param, _ in self.row_rates]
        for opt in self._all:
            opt.step()
        for (param, rate), old in zip(self.row_rates, before):
            param.copy_(old.lerp_(param, rate))  # old + rate · (new - old)
        for param, master in self.masters:
            param.copy_(master)

    def set_lr_scale(self, scale: float) -> None:
        for opt in self._all:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * scale

    def state_dict(self) -> dict:
        experts = None if self.experts is None else self.experts.state_dict()
        return {"dense": self.dense.state_dict(), "experts": experts,
                "masters": [master.detach().clone() for _, master in self.masters]}

    def load_state_dict(self, state: dict) -> None:
        self.dense.load_state_dict(state["dense"])
        if self.experts is not None:
            self.experts.load_state_dict(state["experts"])
        with torch.no_grad():
            for (param, master), saved in zip(self.masters, state.get("masters", [])):
                master.copy_(saved)
                param.copy_(saved)


def build_optimizers(model: nn.Module, cfg: TrainConfig,
                     lr_scales: Mapping[int, float | torch.Tensor] | None = None) -> Optimizers:
    """The two optimizers for ``model``'s trainable parameters. ``lr_scales`` (by ``id(param)``)
    multiplies a parameter's learning rate: a float, or a (rows,) tensor of per-row multipliers (e.g. old
    experts or sub-keys slower than new ones: SparseRowAdam's row rates for an expert table,
    :class:`Optimizers`' ``row_rates`` for a dense parameter). A model
    whose config says ``parameterization="mssp"`` multiplies them by its per-group multipliers
    (:func:`peer_model.parameterization.lr_multipliers`; none under "standard")."""
    lr_scales = lr_scales or {}
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        lr_scales = combine(lr_scales, lr_multipliers(model, config))
    experts = [
        table
        for layer in model.modules() if isinstance(layer, PEER)
        for table in (layer.expert_down, layer.expert_up) if table.requires_grad
    ]
    expert_ids = {id(p) for p in experts}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    matrices |= {id(p) for p in model.parameters() if p.dim() >= 3}  # batched expert matrices (MoE, SwitchHead)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    masters, row_rates = [], []
    for param in model.parameters():  # tied weights appear once
        if param.requires_grad and id(param) not in expert_ids:
            scale = lr_scales.get(id(param), 1.0)
            stepped = param
            if param.dtype != torch.float32:  # bf16 on GPU: AdamW steps an fp32 copy (see Optimizers)
                stepped = nn.Parameter(param.detach().float())
                masters.append((param, stepped))
            if isinstance(scale, torch.Tensor):
                row_rates.append((stepped, scale))
                scale = 1.0
            groups.setdefault((id(param) in matrices, float(scale)), []).append(stepped)
    dense = torch.optim.AdamW(
        [{"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, "lr": cfg.lr * scale}
         for (decays, scale), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))]
        or [{"params": []}],
        lr=cfg.lr, betas=cfg.betas,
    )
    sparse = None
    if experts:
        plain = [table for table in experts if id(table) not in lr_scales]
        sparse = SparseRowAdam(([{"params": plain}] if plain else []) + [
            _expert_group(table, lr_scales[id(table)], cfg.expert_lr) for table in experts if id(table) in lr_scales
        ], lr=cfg.expert_lr, betas=cfg.betas)
    return Optimizers(dense, sparse, masters, row_rates)


def _expert_group(table: nn.Parameter, scale: float | torch.Tensor, lr: float) -> dict:
    if isinstance(scale, torch.Tensor):
        return {"params": [table], "row_lr": scale.to(table.device, torch.float32)}
    return {"params": [table], "lr": lr * float(scale)}


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rates for optimizer step ``step`` (1-based, 1..cfg.steps).

    Linear warm-up ``step / warmup_steps`` up to 1 at ``warmup_steps``, then a cosine from 1 down to
    ``min_lr_ratio``, reached at the last step.
    """
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Global L2 norm of all gradients, dense and sparse COO; returns it (before clipping).

    ``torch.nn.utils.clip_grad_norm_`` raises NotImplementedError on sparse gradients (torch 2.13:
    no ``linalg_vector_norm`` for SparseCPU). A sparse gradient's norm is that of its values once
    duplicate rows are summed (coalesced, never densified). When the norm exceeds ``max_norm`` every
    gradient is scaled in place to bring it to ``max_norm``. A parameter holding one process' columns of
    a sharded table (``column_shards``, peer_model/distributed) counts with the norm of the whole table,
    summed over the processes, so that every process clips by the same global norm.
    """
    grads, sharded, shards = [], [], None
    for param in params:
        if param.grad is None:
            continue
        if getattr(param, "column_shards", None) is not None:
            shards, into = param.column_shards, sharded
        else:
            into = grads
        if param.grad.is_sparse:
            param.grad = coalesced(param.grad)
            into.append(param.grad._values())  # an alias: scaling it scales the gradient
        else:
            into.append(param.grad)
    if not grads and not sharded:
        return 0.0
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads + sharded]
    total = torch.linalg.vector_norm(torch.stack(norms[: len(grads)] or [norms[0].new_zeros(())]))
    if shards is not None:
        shard_squares = torch.stack(norms[len(grads) :]).square().sum().reshape(1)
        total = (total.square() + shards.all_reduce_(shard_squares)[0]).sqrt()
    total = total.item()
    if total > max_norm:
        torch._foreach_mul_(grads + sharded, max_norm / (total + 1e-6))
    return total


# ---- evaluation ----------------------------------------------------------------------------------


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _usage_tracking(model: nn.Module, enabled: bool):
    layers = [m for m in model.modules() if isinstance(m, PEER)]
    before = [layer.track_usage for layer in layers]
    for layer in layers:
        layer.track_usage = enabled
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.track_usage = value


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module, data: TokenData, seq_len: int, batch_size: int, max_batches: int | None = None,
    chunk_tokens: int = TrainConfig.loss_chunk_tokens, on_batch: Callable[[int, int], None] | None = None,
) -> float:
    """Bits per byte: mean next-token cross-entropy (nats) / ln 2 / ``data.bytes_per_token`` over every
    predicted token of the windows of :meth:`TokenData.iter_eval_batches`. Exact for bytes (one token =
    one byte); for a BPE it divides by the corpus-average bytes per token, so models with different
    tokenizers compare on the same text. Eval mode (BatchNorm running statistics), no gradients; the
    model's train/eval mode is restored afterwards. The logits are taken ``chunk_tokens`` at a time
    (peer_model/head_loss.py). ``on_batch(done, batches)`` after every batch (progress).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nats, count = 0.0, 0
    try:
        batches = data.eval_batch_count(batch_size, seq_len, max_batches)
        for done, (inputs, targets) in enumerate(data.iter_eval_batches(batch_size, seq_len, max_batches), start=1):
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast_for(device):
                head = model.head(inputs, chunk_tokens)
            total_nats += head_loss(head, targets, 1.0).item()
            count += targets.numel()
            if on_batch is not None:
                on_batch(done, batches)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"no evaluation window: {len(data)} tokens")
    return data.bits_per_byte(total_nats, count)


# ---- training ------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps_done: int
    tokens_seen: int
    final_val_bpb: float | None  # of the returned model; None if it was not evaluated
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    stopped_early: bool = False


LossFn = Callable[[Head, torch.Tensor, torch.Tensor, tuple], torch.Tensor]


def next_byte_loss(head: Head, inputs: torch.Tensor, targets: torch.Tensor, extras: tuple) -> torch.Tensor:
    """The default training loss: mean next-token cross-entropy in nats."""
    return head_loss(head, targets, 1.0 / targets.numel())


def train(
    model: nn.Module,
    train_data: TokenData,
    val_data: TokenData | None,
    cfg: TrainConfig,
    on_log: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    optimizers: Optimizers | None = None,
    loss_fn: LossFn | None = None,
    eval_modules: Sequence[nn.Module] = (),
    after_backward: Callable[[], None] | None = None,
    parallel: DataParallel | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``cfg``'s device.

    ``train_data.sample_batch`` returns ``(inputs, targets, *extras)``; ``loss_fn(head, inputs,
    targets, extras)`` (``head``: the batch's :class:`~peer_model.head_loss.Head`, ``model.head(inputs)``)
    replaces the next-token cross-entropy (e.g. to add distillation on some rows,
    see continual/distillation.py). ``eval_modules`` stay in eval mode throughout (e.g. a BatchNorm whose running
    statistics must not move). ``after_backward()`` runs between the backward and the gradient
    clipping of every step (e.g. to drop gradient rows, see continual.BatchSparseSelection).

    Every ``log_every`` steps, every ``eval_every`` steps and at the last step a record
    ``{step, loss, lr, grad_norm, tokens_per_s, eta_s[, val_bpb]}`` is appended to the history and
    passed to ``on_log``; ``loss`` and ``grad_norm`` are means since the previous record, ``lr`` is the
    dense learning rate, speeds count training time only. ``should_stop`` is polled before every step
    (keep it cheap); when it returns True the loop ends without a further evaluation. ``optimizers``
    (from :func:`build_optimizers` for this model) lets a caller keep or restore optimizer state;
    by default fresh ones are built. ``parallel`` (peer_model/distributed): this process is one of
    several training one model whose expert tables are sharded; its gradients are reduced after every
    backward, ``train_data`` gives its share of each batch (``parallel.batches``) and the logged loss is
    the mean over the processes; ``cfg.batch_size`` is the global batch.

    Segments grown since the model last trained (status ``new``, out of retrieval's reach) open over
    the first ``cfg.open_steps`` steps (:meth:`PEER.open_new_segments`) and are ``active`` once
    training has taken a step.
    """
    device = place_model(model, cfg)
    was_training = model.training

    def training_mode() -> None:
        model.train()
        for module in eval_modules:
            module.eval()

    training_mode()
    loss_fn = loss_fn or next_byte_loss
    if optimizers is None:
        optimizers = build_optimizers(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    opening = [m for m in model.modules() if isinstance(m, PEER) and any(s.status == "new" for s in m.segments)]
    open_steps = min(cfg.steps, cfg.warmup_steps if cfg.open_steps is None else cfg.open_steps)

    result = TrainResult(steps_done=0, tokens_seen=0, final_val_bpb=None)
    start = time.perf_counter()
    interval_start, interval_steps, loss_sum, grad_norm_sum = time.perf_counter(), 0, 0.0, 0.0
    try:
        with _usage_tracking(model, cfg.track_usage):
            for step in range(1, cfg.steps + 1):
                if should_stop is not None and should_stop():
                    result.stopped_early = True
                    break
                scale = lr_scale(step, cfg)
                optimizers.set_lr_scale(scale)
                for layer in opening:
                    layer.open_new_segments(step / open_steps if open_steps else 1.0)
                inputs, targets, *extras = (t.to(device) for t in train_data.sample_batch(
                    cfg.batch_size, cfg.seq_len, generator))
                with autocast_for(device):
                    head = model.head(inputs, cfg.loss_chunk_tokens)  # the logits are the loss's, a chunk at a time
                loss = loss_fn(head, inputs, targets, tuple(extras))
                aux = model.aux_loss() if hasattr(model, "aux_loss") else None
                if aux is not None:  # load-balancing / z losses of mixture-of-experts layers
                    loss = loss + aux
                optimizers.zero_grad()
                loss.backward()
                if after_backward is not None:
                    after_backward()
                if parallel is not None:
                    parallel.reduce_gradients()
                grad_norm_sum += clip_grad_norm(params, cfg.grad_clip)
                optimizers.step()
                result.final_val_bpb = None  # the model changed since the last evaluation
                loss_sum += loss.detach()
                interval_steps += 1
                result.steps_done, result.tokens_seen = step, step * tokens_per_step

                evaluate = val_data is not None and (step % cfg.eval_every == 0 or step == cfg.steps)
                if not (step % cfg.log_every == 0 or evaluate or step == cfg.steps):
                    continue
                seconds = time.perf_counter() - interval_start
                record = {
                    "step": step,
                    "loss": float(loss_sum) / interval_steps if parallel is None
                    else parallel.mean(float(loss_sum) / interval_steps),
                    "lr": cfg.lr * scale,
                    "grad_norm": grad_norm_sum / interval_steps,
                    "tokens_per_s": interval_steps * tokens_per_step / seconds,
                    "eta_s": (cfg.steps - step) * seconds / interval_steps,
                }
                if evaluate:
                    with _usage_tracking(model, False):
                        record["val_bpb"] = evaluate_bpb(model, val_data, cfg.seq_len, cfg.batch_size, cfg.eval_batches,
                                                         cfg.loss_chunk_tokens)
                    training_mode()
                    result.final_val_bpb = record["val_bpb"]
                result.history.append(record)
                if on_log is not None:
                    on_log(record)
                interval_start, interval_steps, loss_sum, grad_norm_sum = time.perf_counter(), 0, 0.0, 0.0
    finally:
        model.train(was_training)
        if result.steps_done:
            for layer in opening:
                layer.open_new_segments(1.0)
    result.elapsed_s = time.perf_counter() - start
    return result
