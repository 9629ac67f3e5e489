"""Row-major layouts: per-axis coordinates of flat token indices and the per-axis AND combinator.

A sequence laid out as ``layout = (L_0, …, L_{n−1})`` stores token ``(x_0, …, x_{n−1})`` at flat index
``Σ_a x_a · stride_a`` with ``stride_a = Π_{b>a} L_b``. An N-d predicate that is an AND of one rule per axis is
:func:`per_axis` of that rule; every N-d predicate of :mod:`attnzoo.masks` is built that way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from attnzoo.masks.core import MaskMod

__all__ = ["AxisRule", "axial", "coordinate", "per_axis", "strides"]

AxisRule = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``rule(x_q, x_k, axis) -> bool tensor``: visibility on one axis from the two coordinates on it."""


def strides(layout: Sequence[int]) -> list[int]:
    """Row-major strides of ``layout``: ``stride_a = Π_{b>a} L_b``."""
    return [math.prod(layout[a + 1 :]) for a in range(len(layout))]


def coordinate(idx: torch.Tensor, layout: Sequence[int], axis: int) -> torch.Tensor:
    """The coordinate on ``axis`` of flat row-major indices ``idx``."""
    return (idx // math.prod(layout[axis + 1 :])) % layout[axis]


def per_axis(layout: Sequence[int], rule: AxisRule, name: str) -> MaskMod:
    """The predicate ``AND_a rule(x_q[a], x_k[a], a)`` on flat row-major indices, with ``__name__ = name``."""
    axes = tuple(zip(layout, strides(layout), strict=True))

    def mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        seen = None
        for a, (length, stride) in enumerate(axes):
            on_axis = rule((q_idx // stride) % length, (kv_idx // stride) % length, a)
            seen = on_axis if seen is None else seen & on_axis
        return seen

    mod.__name__ = mod.__qualname__ = name
    return mod


def axial(layout: Sequence[int], axis: int, causal: bool) -> MaskMod:
    """Axial predicate: same coordinates on every other axis (and ``x_k ≤ x_q`` on ``axis`` when causal)."""

    def rule(xq: torch.Tensor, xk: torch.Tensor, a: int) -> torch.Tensor:
        if a != axis:
            return xq == xk
        return xk <= xq if causal else torch.ones_like(xq == xk)

    return per_axis(layout, rule, "axial_mod")
