"""Mask predicates of generalized (strided) neighborhood attention (GNA, NATTEN `stride`).

Like :mod:`attnzoo.masks_local`, every predicate is a FlexAttention ``mask_mod`` built from elementwise tensor ops, so
one definition serves the dense references, the FlexAttention block masks and the tile masks of the ``torch`` paths.

Generalized neighborhood (GNA / NATTEN ``stride``), per axis of a row-major layout, kernel ``k`` odd, stride ``s``,
dilation ``d``: inside a dilation group (tokens with equal ``x mod d``, group position ``u = x // d``, group length
``L_g``) the queries are cut into stride groups ``⌊u / s⌋``; every query of a stride group uses the window of the
group's *leader* ``ℓ``:

- non-causal: ``ℓ = min(⌊u/s⌋·s + ⌊s/2⌋, L_g − 1)`` (the centre query, the right one of the two for even ``s``) and the
  window is NATTEN's shifted one of ``ℓ``: ``k`` positions from ``clamp(ℓ − k//2, 0, L_g − k)``;
- causal: ``ℓ = min(⌊u/s⌋·s + s − 1, L_g − 1)`` (the last query) and the query sees positions ``w`` with
  ``ℓ − k < w ≤ u``: the window ends at the query itself.

``s = 1`` is the plain neighborhood (:func:`attnzoo.masks_local.neighborhood`); ``s = k`` (non-causal, ``k`` dividing
``L_g``) is blocked attention in non-overlapping windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnzoo.masks import MaskMod

__all__ = ["generalized_neighborhood", "gna_axis", "gna_leader"]


def gna_leader(u: torch.Tensor, group_len: torch.Tensor | int, stride: int, causal: bool) -> torch.Tensor:
    """The stride-group leader of group position ``u`` (see the module docstring)."""
    offset = stride - 1 if causal else stride // 2
    return torch.clamp((u // stride) * stride + offset, max=group_len - 1)


def gna_axis(
    xq: torch.Tensor, xk: torch.Tensor, length: int, kernel: int, stride: int, dilation: int, causal: bool
) -> torch.Tensor:
    """Visibility of key coordinate ``xk`` to query coordinate ``xq`` on one axis (tensors, broadcast together)."""
    group = xq % dilation
    same_group = (xk % dilation) == group
    u, w = xq // dilation, xk // dilation
    group_len = (length - group + dilation - 1) // dilation
    leader = gna_leader(u, group_len, stride, causal)
    if causal:
        return same_group & (w <= u) & (w > leader - kernel)
    start = torch.minimum(torch.clamp(leader - kernel // 2, min=0), group_len - kernel)
    return same_group & (w >= start) & (w < start + kernel)


def generalized_neighborhood(
    layout: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
    causal: Sequence[bool],
) -> MaskMod:
    """The N-d strided neighborhood predicate on flat (row-major) token indices of a sequence laid out as ``layout``."""
    axes = tuple(zip(layout, kernel, stride, dilation, causal, strict=True))
    strides = [math.prod(layout[a + 1 :]) for a in range(len(layout))]

    def gna_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        seen = None
        for (length, k, s, d, c), step in zip(axes, strides, strict=True):
            on_axis = gna_axis((q_idx // step) % length, (kv_idx // step) % length, length, k, s, d, c)
            seen = on_axis if seen is None else seen & on_axis
        return seen

    return gna_mod
