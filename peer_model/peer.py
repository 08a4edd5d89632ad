"""The PEER layer (He 2024, "Mixture of A Million Experts", Algorithm 1).

For each token x and each of h heads: q = BatchNorm(W_q x) split in two halves; the k experts with the
best product-key scores are retrieved (exactly, see retrieval.py); g = softmax over their k scores;
the head's output is Σ_i g_i σ(u_iᵀx) v_i. The layer returns the sum over heads. All heads share one
expert pool and one pair of sub-key sets (the paper's choice).

The pool grows with :meth:`PEER.grow`: new sub-keys and expert rows are appended, ids never move
(see pool.py). A boolean ``trainable`` row mask freezes any set of experts.

Growth preserves the function: a grown segment starts with status ``new``, whose sub-keys carry a
score offset of −∞, so no input can select its experts and the layer's output is bit-identical to the
parent's. Training opens it (:meth:`PEER.open_new_segments`, driven by train()): the offset rises from
−margin to 0 over the opening steps, where margin is twice the largest |half-score| of the first batch
it sees, so on that batch no new sub-key outranks an old one, and the new experts enter top-k
gradually, first on the inputs whose queries their sub-keys match best. A ``masked`` segment (a corpus
forgotten on request) stays at −∞.

Two options of :class:`~peer_model.config.PEERConfig` change the layer:

* ``head_slices`` (MH-MoE, Wu et al. 2024, "Multi-Head Mixture-of-Experts"): x is projected (d × d) and
  cut into ``heads`` sub-tokens of d / heads; each sub-token is a token of its own to one shared query
  projection (d / heads → d_key), retrieves its top-k of the shared pool of d / heads-dimensional
  experts, and the sub-tokens' outputs, concatenated back to d, go through a merge projection (d × d).
  Today's heads all read the full x with their own queries and their outputs are summed; here each
  reads a slice, as MH-MoE's sub-tokens do (its router is shared by the sub-tokens, so is the query).
  Expert tables are d / heads wide: h times fewer parameters and expert FLOPs at the same pool and k.
* ``dynamic_k`` (DA-MoE, see dynamic_k.py): token t keeps the first k_t of its max_k retrieved experts
  in every head, gates softmaxed over those k_t. The fixed-width expert kernels still run max_k slots:
  dropped slots carry gate 0 and their head's first expert id (already in the gradient, so no extra
  optimizer row); the FLOP counter counts the k_t a variable-width kernel would compute.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import PEERConfig
from .dynamic_k import DynamicK, kept_slots
from .experts import expert_mix, expert_mix_reference
from .pool import ExpertGrid, Segment
from .retrieval import Regions, multihead_retrieve


class PEER(nn.Module):
    def __init__(self, d_model: int, config: PEERConfig, grid: ExpertGrid | None = None):
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.grid = grid or ExpertGrid.square(config.sub_keys)
        half = config.d_key // 2
        # head_slices: every sub-token is a one-query token of d / heads; else every token queries all heads
        self.d_expert = d_model // config.heads if config.head_slices else d_model
        queries = config.d_key if config.head_slices else config.heads * config.d_key
        self.split = nn.Linear(d_model, d_model, bias=False) if config.head_slices else None
        self.merge = nn.Linear(d_model, d_model, bias=False) if config.head_slices else None
        self.query = nn.Linear(self.d_expert, queries, bias=False)
        self.query_norm = nn.BatchNorm1d(queries) if config.query_batchnorm else nn.Identity()
        self.sub_keys1 = nn.Parameter(torch.randn(self.grid.rows, half) * half**-0.5)
        self.sub_keys2 = nn.Parameter(torch.randn(self.grid.cols, half) * half**-0.5)
        n, d_e = self.grid.num_experts, self.d_expert
        summed_heads = 1 if config.head_slices else config.heads  # head outputs summed (not concatenated)
        self.expert_down = nn.Parameter(torch.randn(n, d_e).mul_(d_e**-0.5))  # u_i
        self.expert_up = nn.Parameter(torch.randn(n, d_e).mul_(d_e**-0.5 / math.sqrt(summed_heads)))  # v_i
        self.allocator = DynamicK(config.top_k, config.retrieved_k) if config.dynamic_k else None
        self.wants_importance = config.dynamic_k  # the block passes its attention's token importance
        for name in ("trainable", "usage_counts", "segment_offsets"):
            self.register_buffer(name, None, persistent=False)
        self.init_buffers()
        self._open_progress: float | None = None  # set while new segments open (see open_new_segments)
        self._open_margin: torch.Tensor | None = None
        self.track_usage = False
        # (ids, counted), both (M, heads · k), of the last forward that counted usage: counted is 1 where a
        # slot's expert was counted (0 for a dynamic-k token's dropped slots); lets a padded decode step
        # take its padding rows' counts back out
        self.last_usage: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reference = False  # True: brute-force retrieval and plain autograd experts (for tests)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Every expert trainable, usage counters at zero, score offsets from the segments' status."""
        n = self.grid.num_experts
        with torch.device(device or self.expert_down.device):
            self.trainable = torch.ones(n, dtype=torch.bool)
            self.usage_counts = torch.zeros(n, dtype=torch.long)
            self.segment_offsets = self._status_offsets()
        self._frozen_rows = False  # any row of ``trainable`` False; kept in Python so a forward never syncs

    @property
    def num_experts(self) -> int:
        return self.grid.num_experts

    @property
    def segments(self) -> list[Segment]:
        return self.grid.segments

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (M, d_expert) → (gates, ids), both (M, heads * k) (with head_slices: (M, k), x sub-tokens);
        gates sum to 1 within each head. With dynamic_k, k = max_k (see :meth:`_keep_first`)."""
        cfg = self.config
        queries = self.query_norm(self.query(x))
        return multihead_retrieve(queries, self.sub_keys1, self.sub_keys2, self.grid, cfg.d_key, cfg.retrieved_k,
                                  self.reference, self._retrieval_regions(queries))

    def _keep_first(self, gates: torch.Tensor, ids: torch.Tensor,
                    importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DA-MoE: each token keeps its k_t best experts per head. gates, ids: (M, heads * max_k), best
        first within a head → gates renormalised over the kept slots (= the softmax of their scores),
        dropped slots' ids replaced by their head's first id, and the (M, heads * max_k) kept mask."""
        m, k_max = gates.shape[0], self.config.retrieved_k
        k = self.allocator(importance)  # (M,)
        keep = kept_slots(k, k_max).unsqueeze(1).expand(m, self.config.heads, k_max)  # (M, heads, max_k)
        gates = gates.view(m, -1, k_max) * keep
        gates = gates / gates.sum(-1, keepdim=True)
        ids = ids.view(m, -1, k_max)
        ids = torch.where(keep, ids, ids[:, :, :1])
        return gates.reshape(m, -1), ids.reshape(m, -1), keep.reshape(m, -1)

    def _retrieval_regions(self, queries: torch.Tensor) -> Regions | None:
        """The cells retrieval may select, as regions of :func:`~peer_model.retrieval.multihead_retrieve`; None
        while every segment is active (the common case after training: retrieval then adds nothing).

        The first region is every open sub-key's row and column, with the segments' offsets (a closed
        segment's sub-keys at ``-inf``, an opening one's at its opening offset). That is exact for a closed
        segment with no open segment after it. A closed segment *s* followed by open ones adds two regions: its
        rows × the later open segments' columns, and the later open segments' rows × its columns; their cells are
        the later segments' (a cell belongs to the newer of its row's and its column's segments, pool.py), so
        masking a corpus' segment takes exactly its experts out of reach and no later one."""
        segments = self.grid.segments
        if self._open_progress is None and all(s.status == "active" for s in segments):
            return None
        offsets = self.segment_offsets
        if self._open_progress is not None:
            if self._open_margin is None:
                self._open_margin = self._score_margin(queries)
            opening = self.segment_offsets.new_tensor([s.status == "new" for s in self.grid.segments],
                                                      dtype=torch.bool)
            offsets = torch.where(opening, -(1.0 - self._open_progress) * self._open_margin, offsets)
        row_segment, col_segment = self.grid.row_segments(offsets.device)
        regions = [(offsets[row_segment], offsets[col_segment])]
        closed = [s.status == "masked" or (s.status == "new" and self._open_progress is None) for s in segments]
        for index in range(len(segments)):
            if closed[index] and not all(closed[index + 1:]):
                own = torch.full_like(offsets, float("-inf"))
                own[index] = 0.0
                later = offsets.clone()
                later[: index + 1] = float("-inf")
                regions += [(own[row_segment], later[col_segment]), (later[row_segment], own[col_segment])]
        return regions

    @torch.no_grad()
    def _score_margin(self, queries: torch.Tensor) -> torch.Tensor:
        """Twice the largest |half-score| of ``queries`` against any sub-key: offset by it, a sub-key
        scores below every other one on these queries."""
        half = self.config.d_key // 2
        q = queries.detach().reshape(-1, self.config.d_key).float()
        bound = torch.maximum((q[:, :half] @ self.sub_keys1.detach().float().t()).abs().amax(),
                              (q[:, half:] @ self.sub_keys2.detach().float().t()).abs().amax())
        return 2.0 * bound

    def _status_offsets(self) -> torch.Tensor:
        return torch.tensor([0.0 if s.status == "active" else float("-inf") for s in self.grid.segments])

    def sub_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d) → what queries the pool: the tokens (M, d), or with head_slices their sub-tokens
        (M · heads, d / heads)."""
        x = x.reshape(-1, self.d_model)
        return x if self.split is None else self.split(x).reshape(-1, self.d_expert)

    def forward(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., d) → (..., d). ``importance`` (the tokens' attention importance, x's shape without d):
        required with dynamic_k, ignored otherwise."""
        shape = x.shape
        m = x.numel() // self.d_model
        x = self.sub_tokens(x)
        gates, ids = self.route(x)
        counted = None
        if self.allocator is not None:
            if importance is None:
                raise ValueError("a dynamic-k PEER layer needs the tokens' importance (see dynamic_k.py)")
            gates, ids, counted = self._keep_first(gates, ids, importance.reshape(-1))
        if self.track_usage:
            counted = torch.ones_like(ids) if counted is None else counted.long()
            self.usage_counts.index_add_(0, ids.reshape(-1), counted.reshape(-1))
            self.last_usage = ids.view(m, -1), counted.view(m, -1)
        out = self.mix(x, ids, gates)
        if self.merge is not None:
            out = self.merge(out.reshape(m, self.d_model).to(self.merge.weight.dtype))
        return out.reshape(shape).to(x.dtype)

    def mix(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x: (M, d); ids, gates: (M, heads * k) → Σ_e gates · σ(u_idsᵀ x) · v_ids, (M, d). A layer whose
        expert tables are sharded over processes replaces it (peer_model/distributed)."""
        if self.reference:
            return expert_mix_reference(x, ids, gates, self.expert_down, self.expert_up, self.config.activation)
        frozen_rows = self.trainable if self._frozen_rows else None
        return expert_mix(x, ids, gates, self.expert_down, self.expert_up, self.config.activation, frozen_rows)

    # ---- growth and freezing -------------------------------------------------------------------

    @torch.no_grad()
    def grow(self, num_experts: int | None = None, *, rows: int | None = None, cols: int | None = None,
             tag: str = "", key_scale: float = 0.5, generator: torch.Generator | None = None) -> Segment:
        """Append experts; returns their segment, status ``new``: out of retrieval's reach until
        training opens it, so the layer's output does not change. Give ``num_experts`` (rounded up to
        fill the grid) or the new grid shape ``rows``/``cols``.

        New up-vectors start at zero, so a new expert adds nothing until trained, and new sub-keys are
        drawn at ``key_scale`` × the RMS of the existing ones, so once open they win only part of the
        selections at first (at 1.0, on a trained model whose pool was doubled, they won 30% and the
        held-out loss rose by 11%; at 0.5, 5% and < 1%: tests/test_growth.py's setting).
        ``generator`` draws the new sub-keys and down-vectors (default: torch's global generator), so a
        caller that seeds it grows the same experts whatever ran before.
        """
        if num_experts is not None:
            rows, cols = self.grid.plan_growth(num_experts)
        rows = self.grid.rows if rows is None else rows
        cols = self.grid.cols if cols is None else cols
        segment = self.grid.grow(rows, cols, tag, status="new")
        self.sub_keys1 = _extended(self.sub_keys1, rows, _like_rms(self.sub_keys1, key_scale, generator))
        self.sub_keys2 = _extended(self.sub_keys2, cols, _like_rms(self.sub_keys2, key_scale, generator))
        self._grow_expert_tables(segment.end, generator)
        self.trainable = torch.cat([self.trainable, self.trainable.new_ones(segment.size)])
        self.usage_counts = torch.cat([self.usage_counts, self.usage_counts.new_zeros(segment.size)])
        self.segment_offsets = torch.cat([self.segment_offsets, self.segment_offsets.new_full((1,), float("-inf"))])
        return segment

    def _grow_expert_tables(self, rows: int, generator: torch.Generator | None = None) -> None:
        """Extend both tables to ``rows`` rows: new down-vectors random at the table's RMS, new up-vectors zero."""
        self.expert_down = _extended(self.expert_down, rows, _like_rms(self.expert_down, generator=generator))
        self.expert_up = _extended(self.expert_up, rows, torch.Tensor.zero_)

    @torch.no_grad()
    def key_new_sub_keys(self, queries: torch.Tensor, old_rows: int, old_cols: int,
                         generator: torch.Generator | None = None) -> None:
        """Data-keyed growth: set the sub-keys added since the grid was ``old_rows × old_cols`` to
        half-queries drawn from ``queries`` (M, heads · d_key; normalised queries of the text the new
        experts are for), rescaled to the mean norm of the old sub-keys. The new experts then sit
        where that text's queries point, so retrieval sends it to them once the segment opens;
        random new sub-keys are rarely chosen over trained old ones (measured in BENCHMARKS.md 3c)."""
        half = self.config.d_key // 2
        q = queries.detach().reshape(-1, self.config.d_key).float()
        for keys, halves, old in ((self.sub_keys1, q[:, :half], old_rows), (self.sub_keys2, q[:, half:], old_cols)):
            new = keys.shape[0] - old
            if new <= 0:
                continue
            if halves.shape[0] >= new:
                picked = halves[torch.randperm(halves.shape[0], generator=generator)[:new]]
            else:
                picked = halves[torch.randint(0, halves.shape[0], (new,), generator=generator)]
            scale = keys[:old].float().norm(dim=1).mean()
            keys[old:] = (picked / picked.norm(dim=1, keepdim=True).clamp_min(1e-6) * scale).to(keys.dtype)

    def open_new_segments(self, progress: float) -> None:
        """Bring the ``new`` segments into retrieval: their score offset is −(1 − progress) × margin
        (the margin is measured on the next forward's queries); at progress ≥ 1 they become ``active``."""
        if not any(s.status == "new" for s in self.grid.segments):
            return
        if progress >= 1.0:
            for index, segment in enumerate(self.grid.segments):
                if segment.status == "new":
                    self.set_segment_status(index, "active")
            self._open_progress = self._open_margin = None
            return
        self._open_progress = max(0.0, float(progress))

    def set_segment_status(self, index: int, status: str) -> Segment:
        """``active``: in retrieval; ``new`` or ``masked``: this segment's experts out of reach (and no
        other: see :meth:`_retrieval_regions`)."""
        segment = self.grid.set_status(index, status)
        self.segment_offsets[index] = 0.0 if status == "active" else float("-inf")
        return segment

    def set_trainable(self, ids: torch.Tensor | slice, trainable: bool) -> None:
        """Freeze (False) or unfreeze (True) expert rows; frozen rows stay bit-identical in training."""
        self.trainable[ids] = trainable
        self._frozen_rows = not trainable or not bool(self.trainable.all())  # a sync here, never in forward

    def freeze_segments(self, indices: list[int]) -> None:
        for index in indices:
            seg = self.grid.segments[index]
            self.set_trainable(slice(seg.start, seg.end), False)

    def reset_usage(self) -> None:
        self.usage_counts.zero_()


def _like_rms(table: torch.Tensor, scale: float = 1.0, generator: torch.Generator | None = None):
    """In-place initialiser: Gaussian rows with ``scale`` × the RMS of ``table``, drawn by ``generator``."""
    rms = table.detach().float().pow(2).mean().sqrt().item() * scale
    return lambda rows: rows.normal_(0.0, rms, generator=generator)


def _extended(param: nn.Parameter, rows: int, init) -> nn.Parameter:
    """A new parameter with ``param``'s rows unchanged and ``rows - len(param)`` rows initialised in place by
    ``init``. One allocation of the grown table and no temporaries: growing a pool of several GB costs
    the new table, not three copies of it."""
    grown = param.detach().new_empty(rows, *param.shape[1:])
    grown[: param.shape[0]] = param.detach()
    init(grown[param.shape[0] :])
    return nn.Parameter(grown, requires_grad=param.requires_grad)
