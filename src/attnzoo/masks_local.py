"""Mask predicates of the local (structured-sparsity) family: sliding windows and NATTEN-style neighborhoods.

Every predicate here is a FlexAttention ``mask_mod`` (see :mod:`attnzoo.masks`) written with elementwise tensor ops
only, so one definition serves the dense references (:func:`attnzoo.masks.dense`), the cached FlexAttention block masks
and the tile masks of the blockwise ``torch`` paths (:func:`neighborhood_axis` on one axis' coordinates).

Neighborhood semantics (NATTEN's, per axis of a row-major layout, for kernel size ``k`` odd and dilation ``d``):
tokens whose coordinate ``x`` has the same residue ``x mod d`` form a dilation group; within its group a query at
group position ``u = x // d`` sees

- non-causal: the ``k`` group positions starting at ``clamp(u − k//2, 0, L_g − k)``, where ``L_g`` is the group's
  length: the window is shifted inward at the borders so every query sees exactly ``k`` keys;
- causal: group positions ``u − k + 1 … u`` that exist (fewer than ``k`` near the start).

A key is visible iff it is visible on every axis. ``L_g ≥ k`` for every group iff ``k · d ≤`` the axis length, which the
methods validate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from attnzoo.masks import MaskMod

__all__ = [
    "axial", "dilated", "grid", "grouped", "halo", "halo_axis", "neighborhood", "neighborhood_axis", "sliding_window",
    "sliding_window_starts", "window_partition",
]


def neighborhood_axis(
    xq: torch.Tensor, xk: torch.Tensor, length: int, kernel: int, dilation: int, causal: bool
) -> torch.Tensor:
    """Visibility of key coordinate ``xk`` to query coordinate ``xq`` on one axis (tensors, broadcast together)."""
    group = xq % dilation
    same_group = (xk % dilation) == group
    u = xq // dilation
    w = xk // dilation
    if causal:
        return same_group & (w <= u) & (w > u - kernel)
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum(torch.clamp(u - kernel // 2, min=0), group_len - kernel)
    return same_group & (w >= start) & (w < start + kernel)


def neighborhood(
    layout: Sequence[int], kernel: Sequence[int], dilation: Sequence[int], causal: Sequence[bool]
) -> MaskMod:
    """The N-d neighborhood predicate on flat (row-major) token indices of a sequence laid out as ``layout``."""
    axes = tuple(zip(layout, kernel, dilation, causal, strict=True))
    strides = [math.prod(layout[a + 1 :]) for a in range(len(layout))]

    def neighborhood_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        seen = None
        for (length, k, d, c), stride in zip(axes, strides, strict=True):
            on_axis = neighborhood_axis((q_idx // stride) % length, (kv_idx // stride) % length, length, k, d, c)
            seen = on_axis if seen is None else seen & on_axis
        return seen

    return neighborhood_mod


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


def axial(layout: Sequence[int], axis: int, causal: bool) -> MaskMod:
    """Axial predicate on flat row-major indices: same coordinates on every other axis (and ``j ≤ i`` on ``axis``
    when causal)."""
    stride = math.prod(layout[axis + 1 :])
    length = layout[axis]

    def axial_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        xq, xk = (q_idx // stride) % length, (kv_idx // stride) % length
        same_line = (q_idx - xq * stride) == (kv_idx - xk * stride)
        return same_line & (xk <= xq) if causal else same_line

    return axial_mod


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
    axes = tuple(zip(layout, block, halo_size, strict=True))
    strides = [math.prod(layout[a + 1 :]) for a in range(len(layout))]

    def halo_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        seen = None
        for (length, bl, ha), stride in zip(axes, strides, strict=True):
            on_axis = halo_axis((q_idx // stride) % length, (kv_idx // stride) % length, bl, ha)
            seen = on_axis if seen is None else seen & on_axis
        return seen

    return halo_mod


def grouped(q_ids: torch.Tensor, kv_ids: torch.Tensor) -> MaskMod:
    """Group (document / instance / region) predicate: key ``j`` visible to query ``i`` of batch ``b`` iff
    ``q_ids[b, i] == kv_ids[b, j]``. ``q_ids (B, Sq)``, ``kv_ids (B, Skv)``: integer tensors (or expanded views)."""

    def grouped_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return q_ids[b, q_idx] == kv_ids[b, kv_idx]

    return grouped_mod


def _per_axis(layout: Sequence[int], test: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> MaskMod:
    strides = [math.prod(layout[a + 1 :]) for a in range(len(layout))]

    def mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        seen = None
        for a, (length, stride) in enumerate(zip(layout, strides, strict=True)):
            on_axis = test((q_idx // stride) % length, (kv_idx // stride) % length, a)
            seen = on_axis if seen is None else seen & on_axis
        return seen

    return mod


def window_partition(layout: Sequence[int], window: Sequence[int]) -> MaskMod:
    """MaxViT block attention: same non-overlapping window on every axis (``x_q // P == x_k // P``)."""
    return _per_axis(layout, lambda xq, xk, a: (xq // window[a]) == (xk // window[a]))


def grid(layout: Sequence[int], grid_size: Sequence[int]) -> MaskMod:
    """MaxViT grid attention: each axis is split as ``x = g · (L/G) + r``; tokens with equal ``r`` on every axis
    attend to each other (a sparse, dilated ``G × G`` grid spanning the whole layout)."""
    return _per_axis(layout, lambda xq, xk, a: (xq % (layout[a] // grid_size[a])) == (xk % (layout[a] // grid_size[a])))
