"""Partitioned attention: tokens regrouped so that every attention group is a contiguous, equal-sized batch entry.

Each axis ``a`` of a row-major layout is split as ``x = o · inner_a + i`` (``outer_a = L_a / inner_a``). With
``group="outer"`` tokens sharing every ``o`` form a group whose sequence runs over the ``i`` (non-overlapping windows);
with ``group="inner"`` tokens sharing every ``i`` form a group whose sequence runs over the ``o`` (a strided grid).
One permutation, one batched ``scaled_dot_product_attention`` with no mask, one inverse permutation: the work is
exactly the groups' ``Σ n_g²·d`` and nothing is gathered per element.

``return_lse=True``: a token's keys are its group, so its row log-sum-exp is the group's: the batched call is
:func:`attnzoo.kernels.dense.attention_lse` instead (the CPU flash kernel with the log-sum-exp's gradient), and the
log-sum-exp goes through the same inverse permutation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from attnzoo.kernels.dense import attention_lse


def _dims(layout: Sequence[int], inner: Sequence[int], group: str) -> tuple[list[int], list[int], list[int]]:
    """Sizes of the split grid ``(o_0, i_0, o_1, i_1, …)`` and which of its dims (offset by 2 for B, H) group / run."""
    sizes = [s for length, i in zip(layout, inner, strict=True) for s in (length // i, i)]
    outer = [2 + 2 * a for a in range(len(layout))]
    inner_dims = [3 + 2 * a for a in range(len(layout))]
    return (sizes, outer, inner_dims) if group == "outer" else (sizes, inner_dims, outer)


def _split(x: torch.Tensor, layout: Sequence[int], inner: Sequence[int], group: str) -> torch.Tensor:
    """``(B, H, N, D)`` → ``(B · groups, H, group size, D)``."""
    b, h, _, d = x.shape
    sizes, group_dims, seq_dims = _dims(layout, inner, group)
    grid = x.reshape(b, h, *sizes, d).permute(0, *group_dims, 1, *seq_dims, len(sizes) + 2)
    return grid.reshape(-1, h, math.prod(sizes[i - 2] for i in seq_dims), d)


def _merge(y: torch.Tensor, b: int, layout: Sequence[int], inner: Sequence[int], group: str) -> torch.Tensor:
    """Inverse of :func:`_split`: ``(B · groups, H, group size, D)`` → ``(B, H, N, D)``."""
    h, d = y.shape[1], y.shape[-1]
    sizes, group_dims, seq_dims = _dims(layout, inner, group)
    order = [0, *group_dims, 1, *seq_dims, len(sizes) + 2]
    shape = [b, *(sizes[i - 2] for i in group_dims), h, *(sizes[i - 2] for i in seq_dims), d]
    return y.reshape(shape).permute(*(order.index(i) for i in range(len(order)))).reshape(b, h, -1, d)


def partitioned_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, layout: Sequence[int], inner: Sequence[int],
    group: str, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention within the groups of a partition of ``layout`` (see the module docstring); GQA without copies. With
    ``return_lse``, also the rows' log-sum-exp ``(B, H, N)``."""
    qs, ks, vs = (_split(x, layout, inner, group) for x in (q, k, v))
    if return_lse:
        y, lse = attention_lse(qs, ks, vs, causal=False, scale=scale, mask=None, bias=None)
        b = q.shape[0]
        return _merge(y, b, layout, inner, group), _merge(lse.unsqueeze(-1), b, layout, inner, group).squeeze(-1)
    y = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return _merge(y, q.shape[0], layout, inner, group)
