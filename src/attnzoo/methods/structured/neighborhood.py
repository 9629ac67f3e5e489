"""P2 — neighborhood attention, 1-D/2-D/3-D, with dilation and per-axis causal masking (NATTEN semantics).

Papers: "Neighborhood Attention Transformer" (Hassani et al., arXiv:2204.07143), "Dilated Neighborhood Attention
Transformer" (arXiv:2209.15001), "Faster Neighborhood Attention" (arXiv:2403.04690); parameter names follow NATTEN.

Formula as implemented: the sequence is a row-major grid of shape ``layout`` (default ``(seq,)``); query ``i`` attends
with softmax to the keys in its neighborhood ``N(i)`` (AND the user mask), ``O_i = Σ_{j∈N(i)} softmax_j(s_ij) v_j``,
``s = scale · q·k + bias``. Per axis (kernel ``k`` odd, dilation ``d``), tokens with equal ``x mod d`` form a group;
within it the query at group position ``u`` sees the ``k`` positions from ``clamp(u − k//2, 0, L_g − k)`` (the window
shifts inward at the borders so every query sees exactly ``k`` keys per axis), or with causal masking on that axis the
positions ``u − k + 1 … u`` that exist. The predicate is :func:`attnzoo.masks.neighborhood.neighborhood`.

Causal masking: ``causal=True`` makes every axis causal; ``is_causal`` (bool or a tuple per axis, NATTEN's name) makes
the listed axes causal (an axis is causal if either says so). Choice: this is NATTEN's causal window (the ``k`` most
recent positions), not "neighborhood AND j ≤ i".

Defaults: ``kernel_size=7`` (clamped by the user, never silently), ``dilation=1``. Validation: kernel sizes odd,
``kernel_size · dilation ≤`` the axis length (so every dilation group has at least ``k`` positions), ``layout``'s
product equal to the sequence length. Self-attention only; GQA supported.

Fast path ``torch`` (:mod:`attnzoo.kernels.band`): per axis, each dilation group is cut into tiles of consecutive
group positions (1-D: 128; 2-D: 8×16; 3-D: 4×4×8); a tile sees a band of ``tile + k − 1`` positions on each axis.
N-d tiles are the products of per-axis tiles, their keys gathered and one batched SDPA with a tile mask runs per chunk
of tiles. Work ``≈ N · Π(t_a + k_a − 1)`` instead of ``N²``; memory O(chunk · W · d). Tilings are cached by
configuration. Fast path ``flex``: FlexAttention with the predicate's block mask (cached), forward only on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels.band import product_tiles, strided_band_tiles
from attnzoo.masks.neighborhood import neighborhood as neighborhood_mod
from attnzoo.masks.neighborhood import neighborhood_axis
from attnzoo.methods.structured.common import check_layout, mask_method, per_axis_ints
from attnzoo.registry import SELF_PATTERNS, Call, MethodSpec, Param, TestHints, register

Axes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]
TILES = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}


def _tuple(value: Any, ndim: int) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * ndim


def _layout(value: tuple[int, ...] | None, call: Call) -> tuple[int, ...]:
    return (call.seq_q,) if value is None else value


def _check_layout(value: Any, call: Call) -> str | None:
    return check_layout(value, call, max_ndim=3)


def _check_kernel(value: Any, call: Call) -> str | None:
    kernel = per_axis_ints("kernel_size", value, call, 1)
    if isinstance(kernel, str):
        return kernel
    layout = call.params.get("layout")
    if _check_layout(layout, call) is not None:
        return None  # the layout's own check reports it
    dilation = per_axis_ints("dilation", call.params.get("dilation", 1), call, 1)
    if isinstance(dilation, str):
        return None
    for k, d, n in zip(kernel, dilation, _layout(layout, call), strict=True):
        if k % 2 == 0:
            return "odd kernel sizes"
        if k * d > n:
            return f"kernel_size · dilation <= the axis length (axis of {n} with dilation {d})"
    return None


def _check_dilation(value: Any, call: Call) -> str | None:
    dilation = per_axis_ints("dilation", value, call, 1)
    return dilation if isinstance(dilation, str) else None


def _check_is_causal(value: Any, call: Call) -> str | None:
    if _check_layout(call.params.get("layout"), call) is not None:
        return None  # the layout's own check reports it
    ndim = len(_layout(call.params.get("layout"), call))
    if isinstance(value, tuple) and (len(value) != ndim or not all(isinstance(x, bool) for x in value)):
        return f"a bool or a tuple of {ndim} bools (one per layout axis)"
    return None


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    k = min(call.seq_q, 7)
    return {"kernel_size": k - (k % 2 == 0)}


SPEC = MethodSpec(
    name="neighborhood",
    family="structured",
    mechanism="P2",
    paper="Neighborhood Attention Transformer (also: Dilated NAT; Faster Neighborhood Attention)",
    arxiv="2204.07143",
    summary="each token attends to its kernel_size nearest neighbours per axis (1-D/2-D/3-D), NATTEN semantics",
    exact=True,
    patterns=SELF_PATTERNS,
    params=(
        Param("kernel_size", (int, tuple), 7, "neighborhood size per axis (odd int or tuple)", low=1,
              check=_check_kernel),
        Param("dilation", (int, tuple), 1, "dilation per axis (int or tuple)", low=1, check=_check_dilation),
        Param("layout", (tuple,), None, "spatial shape of the sequence, 1 to 3 axes; None means (seq,)",
              check=_check_layout),
        Param("is_causal", (bool, tuple), False, "causal masking per axis (bool or tuple); causal=True sets all",
              check=_check_is_causal),
    ),
    complexity="O(N·Π(t+k−1)·d) time with tiles t (≈ N·k·d), O(N·d) memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
)


def _axes(seq: int, causal: bool, kernel_size: Any, dilation: Any, layout: Any, is_causal: Any) -> Axes:
    shape = (seq,) if layout is None else tuple(layout)
    ndim = len(shape)
    per_axis_causal = tuple(c or causal for c in _tuple(is_causal, ndim))
    return shape, _tuple(kernel_size, ndim), _tuple(dilation, ndim), per_axis_causal


def _axis_tiling(length: int, kernel: int, dilation: int, causal: bool, tile: int) -> tuple[torch.Tensor, ...]:
    """One axis' tiles over coordinates: per dilation group, bands of consecutive group positions."""

    def starts(group_len: int) -> torch.Tensor:
        u = torch.arange(group_len)
        return u - kernel + 1 if causal else torch.clamp(u - kernel // 2, min=0, max=group_len - kernel)

    q_tiles, k_tiles = strided_band_tiles(length, dilation, starts, kernel, tile)
    seen = neighborhood_axis(q_tiles.unsqueeze(2), k_tiles.unsqueeze(1), length, kernel, dilation, causal)
    return q_tiles, k_tiles, seen


def _tiling(axes: Axes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout, kernel, dilation, causal = axes
    tiles = TILES[len(layout)]
    per_axis = [_axis_tiling(*a) for a in zip(layout, kernel, dilation, causal, tiles, strict=True)]
    return product_tiles(per_axis, layout)


def _config(q: torch.Tensor, k: torch.Tensor, causal: bool, *, kernel_size: Any, dilation: Any, layout: Any,
            is_causal: Any) -> Axes:
    return _axes(q.shape[2], causal, kernel_size, dilation, layout, is_causal)


reference, backends = mask_method("neighborhood", _config, lambda axes: neighborhood_mod(*axes), _tiling)
register(SPEC, reference, backends)
