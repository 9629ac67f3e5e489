"""Window predicates on 1-D sequences and row-major layouts: sliding, dilated (strided) and halo windows.

Causal and sliding windows with ``seq_q != seq_kv`` are aligned bottom-right: query ``i`` sits at key position
``c = i + seq_kv − seq_q``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnzoo.masks.core import MaskMod
from attnzoo.masks.layouts import per_axis

__all__ = ["dilated", "halo", "halo_axis", "sliding_window", "sliding_window_starts"]


def sliding_window(seq_q: int, seq_kv: int, window: int, causal: bool, inward: bool = False) -> MaskMod:
    """Sliding-window predicate, queries aligned bottom-right (query ``i`` sits at key position ``c = i + Skv − Sq``).

    - two-sided: ``|j − c| ≤ window``;
    - causal: ``c − window ≤ j ≤ c``;
    - ``inward`` (FreeSwim, two-sided only): the ``2·window + 1`` keys centred on ``c`` shifted inside ``[0, Skv)`` at
      the borders, so every query sees ``min(2·window + 1, Skv)`` keys.
    """
    offset = seq_kv - seq_q
    span = min(2 * window + 1, seq_kv)

    def sliding_window_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        c = q_idx + offset
        if causal:
            return (kv_idx <= c) & (kv_idx >= c - window)
        if inward:
            start = torch.clamp(c - window, min=0, max=seq_kv - span)
            return (kv_idx >= start) & (kv_idx < start + span)
        return (kv_idx >= c - window) & (kv_idx <= c + window)

    return sliding_window_mod


def sliding_window_starts(seq_q: int, seq_kv: int, window: int, causal: bool, inward: bool) -> tuple[torch.Tensor, int]:
    """Each query's first possibly visible key (unclamped) and the span every query's keys fit in.

    Consecutive queries' starts differ by 0 or 1, as :func:`attnzoo.kernels.band.band_tiles` requires.
    """
    c = torch.arange(seq_q) + (seq_kv - seq_q)
    if inward and not causal:
        span = min(2 * window + 1, seq_kv)
        return torch.clamp(c - window, min=0, max=seq_kv - span), span
    return c - window, (window + 1 if causal else 2 * window + 1)


def dilated(dilation: int, window: int | None, causal: bool) -> MaskMod:
    """Dilated (strided) window: key ``j`` visible to query ``i`` iff ``(i − j) mod dilation = 0`` and
    ``|i − j| ≤ window · dilation`` (causal: ``0 ≤ i − j ≤ window · dilation``); ``window=None`` drops the distance
    limit (every ``dilation``-th key, Sparse-Transformer style)."""
    reach = None if window is None else window * dilation

    def dilated_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        diff = q_idx - kv_idx
        seen = (diff % dilation) == 0
        if causal:
            seen = seen & (diff >= 0)
        if reach is not None:
            seen = seen & (diff <= reach) & (diff >= -reach)
        return seen

    return dilated_mod


def halo_axis(xq: torch.Tensor, xk: torch.Tensor, block: int, halo: int) -> torch.Tensor:
    """HaloNet visibility on one axis: the key lies in the query's block widened by ``halo`` on both sides."""
    start = (xq // block) * block - halo
    return (xk >= start) & (xk < start + block + 2 * halo)


def halo(layout: Sequence[int], block: Sequence[int], halo_size: Sequence[int]) -> MaskMod:
    """Blocked local attention with halo on a row-major layout: AND over axes of :func:`halo_axis`."""
    return per_axis(layout, lambda xq, xk, a: halo_axis(xq, xk, block[a], halo_size[a]), "halo_mod")
