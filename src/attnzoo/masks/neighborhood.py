"""Neighborhood attention (NATTEN) and its strided generalisation (GNA, NATTEN ``stride``): one rule per axis.

Per axis of a row-major layout, kernel size ``k`` odd, stride ``s``, dilation ``d``: tokens whose coordinate ``x`` has
the same residue ``x mod d`` form a dilation group (group position ``u = x // d``, group length ``L_g``). The queries
of a group are cut into stride groups ``⌊u / s⌋``; every query of a stride group uses the window of the group's
*leader* ``ℓ``:

- non-causal: ``ℓ = min(⌊u/s⌋·s + ⌊s/2⌋, L_g − 1)`` (the centre query, the right one of two for even ``s``); the
  query sees the ``k`` group positions from ``clamp(ℓ − k//2, 0, L_g − k)``: the window is shifted inward at the
  borders so every query sees exactly ``k`` keys;
- causal: ``ℓ = min(⌊u/s⌋·s + s − 1, L_g − 1)`` (the last query); the query sees positions ``w`` with
  ``ℓ − k < w ≤ u``: the window ends at the query itself.

``s = 1`` gives ``ℓ = u``: plain neighborhood attention (NATTEN's semantics; causal: ``u − k < w ≤ u``).
``s = k`` (non-causal, ``k`` dividing ``L_g``) is blocked attention in non-overlapping windows. A key is visible iff
it is visible on every axis. ``L_g ≥ k`` for every group iff ``k · d ≤`` the axis length, which the methods validate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnzoo.masks.core import MaskMod
from attnzoo.masks.layouts import per_axis

__all__ = ["generalized_neighborhood", "neighborhood", "neighborhood_axis", "stride_leader"]


def stride_leader(u: torch.Tensor, group_len: torch.Tensor | int, stride: int, causal: bool) -> torch.Tensor:
    """The stride-group leader of group position ``u`` (see the module docstring)."""
    offset = stride - 1 if causal else stride // 2
    return torch.clamp((u // stride) * stride + offset, max=group_len - 1)


def neighborhood_axis(
    xq: torch.Tensor, xk: torch.Tensor, length: int, kernel: int, dilation: int, causal: bool, stride: int = 1,
) -> torch.Tensor:
    """Visibility of key coordinate ``xk`` to query coordinate ``xq`` on one axis (tensors, broadcast together)."""
    group = xq % dilation
    same_group = (xk % dilation) == group
    u, w = xq // dilation, xk // dilation
    group_len = (length - group + dilation - 1) // dilation
    leader = u if stride == 1 else stride_leader(u, group_len, stride, causal)
    if causal:
        return same_group & (w <= u) & (w > leader - kernel)
    start = torch.minimum(torch.clamp(leader - kernel // 2, min=0), group_len - kernel)
    return same_group & (w >= start) & (w < start + kernel)


def generalized_neighborhood(
    layout: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
    causal: Sequence[bool], name: str = "generalized_neighborhood_mod",
) -> MaskMod:
    """The N-d strided neighborhood predicate on flat (row-major) token indices of a sequence laid out as ``layout``."""

    def rule(xq: torch.Tensor, xk: torch.Tensor, a: int) -> torch.Tensor:
        return neighborhood_axis(xq, xk, layout[a], kernel[a], dilation[a], causal[a], stride[a])

    return per_axis(layout, rule, name)


def neighborhood(
    layout: Sequence[int], kernel: Sequence[int], dilation: Sequence[int], causal: Sequence[bool],
) -> MaskMod:
    """The N-d neighborhood predicate: :func:`generalized_neighborhood` with stride 1 on every axis."""
    return generalized_neighborhood(layout, kernel, (1,) * len(layout), dilation, causal, name="neighborhood_mod")
