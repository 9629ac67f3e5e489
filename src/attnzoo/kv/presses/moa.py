"""K16 — MoA: a sliding window per head (and per layer), its span chosen by profiling, plus attention sinks.

Paper: "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression" (Fu et al., arXiv:2406.14909).
MoA gives every attention head its own sliding-window span: heads whose attention reaches far keep long windows,
local heads short ones, under one average budget. The spans are chosen offline by profiling on calibration data.

As implemented here:

- :class:`MoAPress` keeps, for every sequence ``b`` and kv head ``h`` of layer ``l``, the first ``sinks`` positions
  and the last ``spans[l, h]`` positions it has seen (``p >= length[b] - span``), at prefill and after every decoding
  step (a slot that slides out of its head's window is dropped), so each head's cache stays at ``sinks + span``.
- :func:`profile_moa` measures, on calibration ``q, k, v`` of each layer, the attention mass that each candidate span
  loses (the causal softmax weight outside sinks + window, averaged over queries, sequences and the query heads of a
  kv head) and picks one span per ``(layer, head)`` minimising the total mass lost subject to
  ``mean(spans) <= budget`` (an exact multiple-choice knapsack solved by dynamic programming over the spans' common
  divisor). The paper ranks its candidate rules by the loss gradient (the accuracy loss predicted from
  ``∂L/∂A``) and also scales spans with the input length (``α + β·N``); lost attention mass at one calibration length
  is the gradient-free stand-in chosen here (no model loss is available to a press), documented as such.

Layout: heads with different spans keep different numbers of tokens. The cache keeps the padded dense layout
(``(B, Hkv, max kept)``, shorter heads' extra slots empty with position ``-1``); the AdaKV-style ragged per-head layout
of the per-head-budget wrapper shrinks that memory to the real counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kernels.dense import safe_softmax
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import Press, PressContext, register_press, top_slots

DEFAULT_SINKS = 4


@dataclass(frozen=True, eq=False)
class MoAPress(Press):
    """Keep ``sinks`` first positions plus each kv head's last ``span`` positions.

    ``spans``: an integer tensor ``(Hkv,)`` (every layer alike) or ``(layers, Hkv)`` (row ``context.layer``; the
    prefill must then be given ``layer=``), e.g. from :func:`profile_moa`. ``sinks``: positions ``0..sinks-1`` are
    always kept (default 4).
    """

    spans: torch.Tensor
    sinks: int = DEFAULT_SINKS

    def __post_init__(self) -> None:
        s = self.spans
        if (not isinstance(s, torch.Tensor) or s.is_floating_point() or s.dim() not in (1, 2) or s.numel() == 0
                or bool((s < 1).any())):
            raise fail("spans", "a (kv_heads,) or (layers, kv_heads) integer tensor of positive window spans",
                       tuple(s.shape) if isinstance(s, torch.Tensor) else repr(s))
        check_positive("sinks", self.sinks)

    def head_spans(self, cache: KVCache, layer: int | None) -> torch.Tensor:
        """``(Hkv,)``: this layer's span per kv head (checked against the cache's kv heads)."""
        spans = self.spans
        if spans.dim() == 2:
            if layer is None or not 0 <= layer < spans.shape[0]:
                raise fail("layer", f"a layer index in [0, {spans.shape[0]}) (the press has per-layer spans)",
                           repr(layer))
            spans = spans[layer]
        if spans.shape[0] != cache.keys.shape[1]:
            raise fail("spans", f"{cache.keys.shape[1]} spans per layer (the cache's kv heads)", spans.shape[0])
        return spans.to(cache.positions.device)

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        spans = self.head_spans(cache, context.layer).view(1, -1, 1)
        pos = cache.positions.long()
        keep = cache.occupied() & ((pos < self.sinks) | (pos >= cache.length.view(-1, 1, 1) - spans))
        if bool((keep == cache.occupied()).all()):
            return cache
        return cache.keep(top_slots(keep.float(), cache, keep.sum(-1)))

    def step(self, cache: KVCache, context: PressContext) -> KVCache:
        return self.compress(cache, context)

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        """Spans profiled on ``calibration=[(q, k, v), ...]`` (one triple per layer) so that the mean span is
        ``fraction`` of the calibration length (minus the sinks); other options (``sinks``, ``candidates``) as
        in :func:`profile_moa` and the constructor."""
        calibration = options.pop("calibration", None)
        if calibration is None:
            raise fail("calibration", "calibration (q, k, v) per layer to profile spans on", None)
        sinks = options.pop("sinks", DEFAULT_SINKS)
        length = calibration[0][1].shape[2]
        budget = max(1.0, fraction * length - sinks)
        spans = profile_moa(calibration, budget, sinks=sinks, **options)
        return cls(spans=spans, sinks=sinks)


def profile_moa(
    calibration: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], budget: float, *,
    sinks: int = DEFAULT_SINKS, candidates: Sequence[int] | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Spans ``(layers, Hkv)`` minimising the attention mass lost on ``calibration`` with mean span ``<= budget``.

    ``calibration``: one ``(q (B, H, S, D), k (B, Hkv, S, D), v)`` per layer (causal self-attention; ``v`` is not
    read). ``candidates``: the spans to choose from (default: powers of two up to ``S``, and ``S``). ``scale``:
    the softmax scale (default ``D**-0.5``).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 1:
        raise fail("budget", "a mean span of at least 1 token", repr(budget))
    check_positive("sinks", sinks)
    if not isinstance(calibration, Sequence) or len(calibration) == 0:
        raise fail("calibration", "a non-empty list of (q, k, v) per layer", type(calibration).__name__)
    length = calibration[0][1].shape[2]
    cands = sorted({int(c) for c in candidates} if candidates is not None else
                   {2**i for i in range(int(math.log2(length)) + 1)} | {length})
    if not cands or cands[0] < 1:
        raise fail("candidates", "positive spans", list(cands))
    if cands[0] > budget:
        raise fail("budget", f"at least the smallest candidate span ({cands[0]})", budget)
    lost = torch.cat([lost_mass(q, k, cands, sinks, scale) for q, k, _ in calibration])  # (layers·Hkv, C)
    choice = _knapsack(lost, cands, budget)
    return torch.tensor(cands, dtype=torch.long)[choice].view(len(calibration), -1)


def lost_mass(
    q: torch.Tensor, k: torch.Tensor, spans: Sequence[int], sinks: int, scale: float | None = None,
) -> torch.Tensor:
    """``(Hkv, len(spans))``: the causal attention mass outside ``sinks`` + the last ``span`` positions, averaged over
    queries, sequences and each kv head's query heads."""
    b, h, s, d = q.shape
    hkv = k.shape[1]
    if k.dim() != 4 or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d or h % hkv:
        raise fail("calibration", f"q (B, H, S, D) and k (B, Hkv, S, D) with k matching q {tuple(q.shape)}",
                   tuple(k.shape))
    scale = d**-0.5 if scale is None else scale
    kk = k.repeat_interleave(h // hkv, dim=1)
    i = torch.arange(s).view(s, 1)
    j = torch.arange(s).view(1, s)
    p = safe_softmax((q @ kk.transpose(-1, -2)).float() * scale, (j <= i).expand(b, h, s, s))
    distance = (i - j).clamp(min=0).expand(b, h, s, s)
    outside_sinks = torch.where(j >= sinks, p, torch.zeros_like(p))
    by_distance = torch.zeros(b, h, s).scatter_add_(2, distance.reshape(b, h, -1), outside_sinks.reshape(b, h, -1))
    tail = by_distance.flip(-1).cumsum(-1).flip(-1)  # tail[w] = mass at distance >= w
    per_head = torch.stack([tail[..., w] if w < s else torch.zeros(b, h) for w in spans], -1) / s
    return per_head.mean(0).view(hkv, h // hkv, len(spans)).mean(1)


def _knapsack(lost: torch.Tensor, spans: list[int], budget: float) -> torch.Tensor:
    """``(N,)`` candidate index per head minimising ``sum(lost)`` subject to ``sum(spans) <= budget · N``."""
    n, c = lost.shape
    unit = math.gcd(*spans)
    sizes = [w // unit for w in spans]
    cap = int(budget * n // unit)
    best = torch.zeros(cap + 1, dtype=torch.float64)  # best[t]: least loss of the heads so far within t units
    picks = []
    for row in lost.double():
        options = torch.full((c, cap + 1), math.inf, dtype=torch.float64)
        for ci, size in enumerate(sizes):
            if size <= cap:
                options[ci, size:] = best[: cap + 1 - size] + row[ci]
        best, pick = options.min(0)
        picks.append(pick)
    choice, t = [], cap
    for pick in reversed(picks):
        ci = int(pick[t])
        choice.append(ci)
        t -= sizes[ci]
    return torch.tensor(choice[::-1])


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise fail(name, "a non-negative int", repr(value))


register_press(MoAPress, "K16", "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
               "2406.14909", "a sliding window per head and layer (plus sinks), spans chosen by profiling",
               ("calibration",))
