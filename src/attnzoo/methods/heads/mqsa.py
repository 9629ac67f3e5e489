"""H6 — multi-query self-attention with L-query windows (MQSA, of MQSA-TED).

Paper: "Collaboration and Transition: Distilling Item Transitions into Multi-Query Self-Attention for Sequential
Recommendation" (Zhu, Shi, Zhang, Wu, Mo, Nie; WSDM 2024; arXiv:2311.01056). Self-attention in sequential
recommenders (SASRec) queries with the embedding of one item, the last; MQSA's ``L``-query self-attention queries
with a window of the last ``L`` items, which carries collaborative signal (what a *run* of items says about the user),
and mixes a long-window and a short-window query to trade bias against variance:

    q̄ᴸ_t = mean of q_i over the window i ∈ [max(0, t − L + 1), t]            (fewer items at the start)
    O_t = α · softmax(scale · q̄ᴸ_t Kᵀ + bias + M) V  +  (1 − α) · softmax(scale · q̄ˢ_t Kᵀ + bias + M) V

with ``L = long_window``, ``S = short_window`` (default 1: the single-item query of SASRec, so α = 0 is plain
softmax attention) and ``α = long_weight``. Keys and values are the items' own (the window changes only the queries).

Choices: the window query is the mean of the window's projected queries, which equals projecting the mean of the
window's item embeddings (the projection is linear); the paper's transition-aware embedding distillation (TED) is a
training loss on item embeddings, not attention, and is not here. Defaults (ours): ``long_window = 8``,
``short_window = 1``, ``long_weight = 0.5``. Self-attention only (the windows run over the same positions as the
keys); causal as in the paper's recommenders, noncausal allowed (the windows still look back).

Fast path ``sdpa`` (:func:`sdpa_windows`): window means by a cumulative sum (``O(N·d)``), then one
:func:`attnzoo.kernels.dense.sdpa_attention` call per window size. The reference averages with an explicit
``(N, N)`` window matrix. Decoding (:data:`DECODER`): the state keeps the keys, values and the last ``L − 1`` raw
queries, so a step's window mean equals the forward's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.kernels.dense import sdpa_attention
from attnzoo.methods.common import dense_scores, repeat_kv, softmax_rows, visible
from attnzoo.registry import SELF_PATTERNS, Backend, Decoder, MethodSpec, Param, register

SPEC = MethodSpec(
    name="mqsa",
    family="heads",
    mechanism="H6",
    paper="Collaboration and Transition: Distilling Item Transitions into Multi-Query Self-Attention for Sequential "
    "Recommendation",
    arxiv="2311.01056",
    summary="queries are means of the last L items' queries; a long and a short window's attentions mixed by α",
    exact=True,
    patterns=SELF_PATTERNS,
    params=(
        Param("long_window", (int,), 8, "L: items in the long query window", low=1),
        Param("short_window", (int,), 1, "S: items in the short query window (1: the item's own query)", low=1),
        Param("long_weight", (float,), 0.5, "α: weight of the long-window attention (1 − α: the short one)", low=0.0,
              high=1.0),
    ),
    complexity="O(N²d) time (two softmax attentions), O(N·d) for the window means",
)


def _window_matrix(n: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``A (n, n)`` with ``A[t, i] = 1 / |W_t|`` for ``i`` in ``W_t = [max(0, t − window + 1), t]``."""
    t = torch.arange(n, device=device).view(-1, 1)
    i = torch.arange(n, device=device).view(1, -1)
    inside = (i <= t) & (i > t - window)
    return inside.to(dtype) / inside.sum(-1, keepdim=True).to(dtype)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, long_window: int, short_window: int, long_weight: float,
) -> torch.Tensor:
    seen = visible(causal, mask, q, k)
    values = repeat_kv(v, q.shape[1])
    outs = []
    for window in (long_window, short_window):
        pooled = _window_matrix(q.shape[2], window, q.dtype, q.device) @ q
        s = dense_scores(pooled, k, scale)
        outs.append(softmax_rows(s if bias is None else s + bias, seen, values))
    return long_weight * outs[0] + (1 - long_weight) * outs[1]


def window_means(q: torch.Tensor, window: int, before: torch.Tensor, start: int) -> torch.Tensor:
    """The window means of ``q (B, H, T, d)``, whose first token is at position ``start``, given the raw queries of
    the ``before.shape[2]`` (≥ ``window − 1``) positions before it (``before (B, H, ·, d)``, zeros before position 0):
    a cumulative sum, window sums as differences, divided by each window's item count."""
    t = q.shape[2]
    history = torch.cat([before[:, :, before.shape[2] - window + 1 :], q], dim=2)  # the window − 1 before, then q
    sums = torch.cumsum(history, dim=2)
    sums = torch.cat([torch.zeros_like(sums[:, :, :1]), sums], dim=2)
    totals = sums[:, :, window:] - sums[:, :, :t]
    counts = (torch.arange(start, start + t, device=q.device) + 1).clamp(max=window).to(q.dtype)
    return totals / counts.view(1, 1, -1, 1)


def _mix(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, before: torch.Tensor, start: int, causal: bool, scale: float,
    mask: torch.Tensor | None, bias: torch.Tensor | None, long_window: int, short_window: int, long_weight: float,
) -> torch.Tensor:
    """``α·attention(long-window queries) + (1 − α)·attention(short-window queries)`` over ``k, v``."""
    long_, short = (sdpa_attention(window_means(q, w, before, start), k, v, causal=causal, scale=scale, mask=mask,
                                   bias=bias) for w in (long_window, short_window))
    return long_weight * long_ + (1 - long_weight) * short


def _no_history(q: torch.Tensor, long_window: int, short_window: int) -> torch.Tensor:
    return q.new_zeros(*q.shape[:2], max(long_window, short_window) - 1, q.shape[3])


def sdpa_windows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, long_window: int, short_window: int, long_weight: float,
) -> torch.Tensor:
    return _mix(q, k, v, _no_history(q, long_window, short_window), 0, causal, scale, mask, bias, long_window,
                short_window, long_weight)


@dataclass
class MQSAState:
    """Decoding state: ``keys``/``values (B, Hkv, T, ·)``, the last ``max(L, S) − 1`` raw ``queries (B, H, ·, d)``
    (zeros before the first token) and ``length``, the tokens seen."""

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    length: int


def _advance(state: MQSAState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             params: dict[str, Any]) -> tuple[torch.Tensor, MQSAState]:
    keys, values = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
    out = _mix(q, keys, values, state.queries, state.length, True, scale, None, None, **params)
    history = torch.cat([state.queries, q], dim=2)
    keep = state.queries.shape[2]
    return out, MQSAState(keys, values, history[:, :, history.shape[2] - keep :], state.length + q.shape[2])


def _empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict[str, Any]) -> MQSAState:
    return MQSAState(k[:, :, :0], v[:, :, :0], _no_history(q, params["long_window"], params["short_window"]), 0)


DECODER = Decoder.advancing(_empty, _advance, chunked=True)

register(SPEC, reference, [Backend("sdpa", sdpa_windows)], DECODER)
