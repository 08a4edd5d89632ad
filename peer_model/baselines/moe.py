"""Coarse-grained mixtures of GELU MLP experts, the MoE baselines of the PEER comparison.

* :class:`NoisyTopKMoE`: noisy top-k gating with the importance and load losses (Shazeer et al. 2017).
* :class:`SwitchMoE`: top-1 routing with an expert capacity, the load-balancing loss (Fedus et al. 2021)
  and the router z-loss (Zoph et al. 2022, ST-MoE).
* :class:`ExpertChoiceMoE`: every expert picks its top tokens (Zhou et al. 2022); not causal, see there.

Tokens are routed by grouping (token, expert) assignments by expert and running one batched matmul per
expert; nothing of size (tokens, experts, hidden) is ever built. The router runs in fp32 even under
autocast (softmax, z-loss and top-k ties are sensitive to bf16 rounding).

:class:`NoisyTopKMoE` also takes MH-MoE's token splitting (``MoEConfig.sub_tokens``) and DA-MoE's dynamic
k (``MoEConfig.dynamic_k``); see there. A dynamic k changes the compute per token, so those models are
compared at equal *average* FLOPs (peer_model/flops.py counts the configured mean k).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from ..dynamic_k import DynamicK, kept_slots

__all__ = ["ExpertChoiceMoE", "NoisyTopKMoE", "SwitchMoE"]


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var / mean² (population variance: 0 for a single expert)."""
    x = x.float()
    return x.var(correction=0) / (x.mean() ** 2 + 1e-10)


class _ExpertMixture(nn.Module):
    """E GELU MLP experts stored as batched weights ``w_up`` (E, d_in, h) and ``w_down`` (E, h, d_in), and
    a bias-free linear router d_in → E, where d_in is d_model (d_model / sub_tokens for MH-MoE's
    sub-tokens). Subclasses route; :meth:`_mix` runs the experts."""

    def __init__(self, d_model: int, d_ff: int, config: MoEConfig, d_in: int | None = None):
        super().__init__()
        self.d_model, self.config = d_model, config
        self.d_in = d_in = d_in or d_model
        self.num_experts = E = config.num_experts
        self.d_expert = h = config.d_expert or d_ff
        # 0.02 like the model's dense weights; the down projection feeds the residual stream and gets
        # 0.02/sqrt(2) (the model's 0.02/sqrt(2·n_layers) needs n_layers, which this module doesn't know).
        self.w_up = nn.Parameter(torch.randn(E, d_in, h) * 0.02)
        self.w_down = nn.Parameter(torch.randn(E, h, d_in) * (0.02 / math.sqrt(2)))
        self.router = nn.Linear(d_in, E, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)  # small, not zero: zero logits all tie
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, float] = {}

    def _logits(self, x: torch.Tensor, linear: nn.Linear | None = None) -> torch.Tensor:
        """(T, d) → (T, E) router logits in fp32, outside autocast."""
        linear = self.router if linear is None else linear
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), linear.weight.float())

    def _mix(self, x: torch.Tensor, token_ids: torch.Tensor, weights: torch.Tensor,
             counts: list[int]) -> torch.Tensor:
        """Σ weight · expert(x[token]) over assignments, per token: (T, d) float32.

        ``token_ids`` / ``weights`` (A,) are grouped by expert: the first ``counts[0]`` go to expert 0,
        the next ``counts[1]`` to expert 1, and so on. Tokens without an assignment get 0.
        """
        out = torch.zeros(x.shape[0], self.d_in, dtype=torch.float32, device=x.device)
        if token_ids.numel() == 0:
            return out
        chunks = x.index_select(0, token_ids).split(counts)
        ys = [F.gelu(chunk @ self.w_up[e]) @ self.w_down[e] for e, chunk in enumerate(chunks) if counts[e]]
        y = torch.cat(ys).float() * weights.float().unsqueeze(1)
        return out.index_add_(0, token_ids, y)


class NoisyTopKMoE(_ExpertMixture):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

    H(x) = x·W_g + ε·(Softplus(x·W_noise) + 0.01), ε ~ N(0, 1), in training when ``noisy_gating`` (no
    noise in eval); the ``top_k`` largest H are kept and softmaxed into gates; output = Σ gates·expert(x).
    No capacity: no token is dropped.

    Auxiliary loss (training only): ``balance_weight`` · (CV(importance)² + CV(load)²), importance =
    Σ_tokens gates per expert; load = Σ_tokens P(expert in the top k under fresh noise), the smooth
    estimator of the paper's appendix; without noisy gating, load = the number of tokens routed to the
    expert (not differentiable: only the importance term then trains the router).

    ``sub_tokens`` = h > 1 (MH-MoE, Wu et al. 2024): x is projected (``split``, d × d) and cut into h
    sub-tokens of d / h, each routed on its own as above to experts of input size d / h (hidden size
    unchanged, so a token's expert FLOPs equal the unsplit layer's at the same k); the h outputs are
    concatenated and projected back (``merge``, d × d). Routing, noise and losses see sub-tokens.

    ``dynamic_k`` (DA-MoE, see peer_model/dynamic_k.py): token t uses its k_t best experts (``top_k`` on
    average, at most ``max_k``), gates softmaxed over those k_t; only those experts run. The load
    estimator then uses each token's own thresholds (its k_t-th and (k_t+1)-th noisy logits).
    """

    def __init__(self, d_model: int, d_ff: int, config: MoEConfig):
        super().__init__(d_model, d_ff, config, d_in=d_model // config.sub_tokens)
        self.top_k = config.top_k
        if config.noisy_gating:
            self.noise = nn.Linear(self.d_in, config.num_experts, bias=False)
            nn.init.zeros_(self.noise.weight)  # as in the paper: noise std starts at softplus(0) + 0.01
        split = config.sub_tokens > 1
        self.split = nn.Linear(d_model, d_model, bias=False) if split else None
        self.merge = nn.Linear(d_model, d_model, bias=False) if split else None
        self.allocator = DynamicK(config.top_k, config.retrieved_k) if config.dynamic_k else None
        self.wants_importance = config.dynamic_k  # the block passes its attention's token importance

    def forward(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., d) → (..., d). ``importance`` (x's shape without d): required with dynamic_k."""
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        if self.split is not None:
            x = self.split(x).reshape(-1, self.d_in)  # (T · h, d / h): the sub-tokens
        T, E, k = x.shape[0], self.num_experts, self.config.retrieved_k
        clean = self._logits(x)
        noisy_train = self.training and self.config.noisy_gating
        if noisy_train:
            noise_std = F.softplus(self._logits(x, self.noise)) + 1e-2
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        m = min(k + 1, E)
        top_values, top_ids = logits.topk(m, dim=-1)  # (T, m), sorted descending
        if self.allocator is None:
            k_token, gates = None, torch.softmax(top_values[:, :k], dim=-1)  # (T, k)
            slots = torch.arange(T * k, device=x.device)
        else:
            if importance is None:
                raise ValueError("a dynamic-k MoE layer needs the tokens' importance (see dynamic_k.py)")
            k_token = self.allocator(importance.reshape(-1))  # (T,)
            keep = kept_slots(k_token, k)
            gates = torch.softmax(top_values[:, :k].masked_fill(~keep, float("-inf")), dim=-1)  # 0 where dropped
            slots = keep.reshape(-1).nonzero().squeeze(1)  # the (token, rank) slots that run, token-major
        expert_ids = top_ids[:, :k].reshape(-1)[slots]
        order = torch.argsort(expert_ids, stable=True)
        counts_t = torch.bincount(expert_ids, minlength=E)
        counts = counts_t.tolist()
        picked = slots[order]
        out = self._mix(x, picked // k, gates.reshape(-1)[picked], counts)

        if self.training:
            importance_e = torch.zeros(T, E, dtype=gates.dtype, device=x.device).scatter(
                1, top_ids[:, :k], gates).sum(0)
            if noisy_train and (k < E or k_token is not None):
                load = self._prob_in_top_k(clean, logits, noise_std, top_values, top_ids[:, :k], k_token).sum(0)
            else:
                load = counts_t.float()
            self.aux_loss = self.config.balance_weight * (_cv_squared(importance_e) + _cv_squared(load))
        else:
            self.aux_loss = None
        assigned = slots.numel()
        mean = assigned / E
        self.last_stats = {"dropped_fraction": 0.0, "experts_per_token": assigned / T if T else 0.0,
                           "max_load_over_mean": max(counts) / mean if mean else 0.0}
        if self.merge is not None:
            out = self.merge(out.to(self.merge.weight.dtype).reshape(-1, self.d_model))
        return out.to(x.dtype).view(shape)

    def _prob_in_top_k(self, clean, noisy, noise_std, top_values, top_ids, k_token=None):
        """(T, E): the probability that each expert is in the top k when the noise is redrawn for it
        alone, the other experts' noisy logits held fixed. An expert now in the top k stays there if
        it beats the (k+1)-th largest noisy logit; one now outside must beat the k-th largest.
        ``k_token`` (T,): a k per token (dynamic k); a token using all E experts keeps them (probability 1)."""
        if k_token is None:
            k = self.top_k
            threshold_if_in = top_values[:, k : k + 1]  # (k+1)-th largest
            threshold_if_out = top_values[:, k - 1 : k]  # k-th largest
            is_in = torch.zeros_like(noisy, dtype=torch.bool).scatter(1, top_ids, True)
        else:
            padded = F.pad(top_values, (0, 1))  # a finite stand-in (E+1)-th logit; masked out below
            threshold_if_in = padded.gather(1, k_token.unsqueeze(1))
            threshold_if_out = padded.gather(1, k_token.unsqueeze(1) - 1)
            is_in = torch.zeros_like(noisy, dtype=torch.bool).scatter(
                1, top_ids, kept_slots(k_token, top_ids.shape[1]))
        prob_if_in = torch.special.ndtr((clean - threshold_if_in) / noise_std)
        if k_token is not None:
            prob_if_in = torch.where((k_token == noisy.shape[1]).unsqueeze(1), 1.0, prob_if_in)
        prob_if_out = torch.special.ndtr((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out)


class SwitchMoE(_ExpertMixture):
    """Switch routing (Fedus et al. 2021): each token goes to its most probable expert i, output =
    p_i(x) · expert_i(x), where p = softmax(router logits).

    Each expert takes at most ``capacity = ceil(capacity_factor · T / E)`` tokens of the T in the call
    (all batch rows flattened, so routing depends on the rest of the batch); tokens past the capacity,
    in token order, are dropped: this layer outputs 0 for them and the residual connection carries
    them. The capacity applies in eval too (a single decoded token is never dropped).

    Auxiliary loss (training only): ``balance_weight`` · E · Σ_i f_i · P_i (f_i = fraction of tokens
    dispatched to expert i before dropping, P_i = mean router probability of i) + ``z_loss_weight`` ·
    mean(logsumexp(logits)²) (router z-loss, Zoph et al. 2022).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        T, E = x.shape[0], self.num_experts
        capacity = self.capacity(T)
        logits = self._logits(x)
        probs = torch.softmax(logits, dim=-1)
        p_top, expert = probs.max(dim=-1)
        order = torch.argsort(expert, stable=True)  # grouped by expert, token order kept within a group
        counts_t = torch.bincount(expert, minlength=E)
        offsets = torch.cumsum(counts_t, 0) - counts_t
        rank = torch.arange(T, device=x.device) - offsets[expert[order]]  # position in its expert's queue
        keep = rank < capacity
        token_ids = order[keep]
        counts_full = counts_t.tolist()
        counts = [min(c, capacity) for c in counts_full]
        out = self._mix(x, token_ids, p_top[token_ids], counts)

        if self.training:
            f = counts_t.float() / max(T, 1)
            balance = E * (f * probs.mean(0)).sum()
            z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
            self.aux_loss = self.config.balance_weight * balance + self.config.z_loss_weight * z_loss
        else:
            self.aux_loss = None
        self.last_stats = {"dropped_fraction": (T - sum(counts)) / T if T else 0.0,
                           "experts_per_token": sum(counts) / T if T else 0.0,
                           "max_load_over_mean": max(counts_full) * E / T if T else 0.0,
                           "capacity": float(capacity)}
        return out.to(x.dtype).view(shape)

    def capacity(self, num_tokens: int) -> int:
        return max(1, math.ceil(self.config.capacity_factor * num_tokens / self.num_experts))


class ExpertChoiceMoE(_ExpertMixture):
    """Expert-choice routing (Zhou et al. 2022): S = softmax over experts of the router logits, (T, E);
    each expert e takes the ``c = ceil(capacity_factor · T / E)`` tokens (at most T) with the largest
    S[:, e]; output for token t = Σ over the experts that chose t of S[t, e] · expert_e(x_t). A token
    may be chosen by several experts or by none (then this layer outputs 0 for it).

    No auxiliary loss (``aux_loss`` is always None): every expert processes exactly c tokens, so the
    load is balanced by construction.

    Not causal: the choice looks at all T tokens of the call, every batch row and every position
    (future ones included), so a token's output depends on the rest of the batch and on later tokens
    (the PEER paper uses it as its MoE baseline all the same). In autoregressive decoding each step
    routes B tokens; with B = 1, c = 1 and every expert processes the single token, so decoding mixes
    all E experts (weighted by S) where training used about ``capacity_factor`` experts per token:
    training and decoding compute different functions, and a prompt's prefill routes differently from
    a teacher-forced pass over the same text at another length.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        T, E = x.shape[0], self.num_experts
        c = self.capacity(T)
        scores = torch.softmax(self._logits(x), dim=-1)  # (T, E)
        if c:
            top_scores, token_ids = scores.t().topk(c, dim=-1)  # (E, c): each expert's tokens
            token_ids = token_ids.reshape(-1)
            out = self._mix(x, token_ids, top_scores.reshape(-1), [c] * E)
            chosen = torch.zeros(T, dtype=torch.bool, device=x.device).index_fill_(0, token_ids, True)
            dropped = 1.0 - chosen.float().mean().item()
        else:
            out, dropped = x.new_zeros(T, self.d_model, dtype=torch.float32), 0.0
        self.aux_loss = None  # balanced by construction
        self.last_stats = {"dropped_fraction": dropped, "experts_per_token": E * c / T if T else 0.0,
                           "tokens_per_expert": float(c)}
        return out.to(x.dtype).view(shape)

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(self.config.capacity_factor * num_tokens / self.num_experts))
