"""P3 — generalized neighborhood attention (GNA): neighborhood attention with a ``stride``.

Paper: "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light" (Hassani et al.,
arXiv:2504.16922); semantics and parameter names follow NATTEN's ``stride`` (read from NATTEN's FlexAttention mask).

Formula as implemented: the sequence is a row-major grid of shape ``layout`` (default ``(seq,)``); query ``i`` attends
with softmax to the keys in its window ``N(i)`` (AND the user mask), ``O_i = Σ_{j∈N(i)} softmax_j(s_ij) v_j``,
``s = scale · q·k + bias``. Per axis (kernel ``k`` odd, stride ``1 ≤ s ≤ k``, dilation ``d``), inside a dilation group
the queries are cut into stride groups of ``s`` consecutive group positions that all share the window of the group's
leader: non-causal, the centre query ``ℓ = min(⌊u/s⌋·s + ⌊s/2⌋, L_g − 1)`` (the right one of the two centres for even
``s``) with NATTEN's border-shifted window ``[clamp(ℓ − k//2, 0, L_g − k), … + k)``; causal, the last query
``ℓ = min(⌊u/s⌋·s + s − 1, L_g − 1)`` and the positions ``ℓ − k < w ≤ u`` (the window still ends at the query).
Predicate: :func:`attnzoo.masks.neighborhood.generalized_neighborhood`. ``stride=1`` is exactly P2 ``neighborhood``;
``stride=kernel_size`` with ``k`` dividing the axis is blocked (non-overlapping window) attention; in between, queries
of a stride group see identical keys, which is what lets fused kernels skip whole tiles (GNA's point).

Parameters as P2 (``kernel_size``, ``dilation``, ``layout``, ``is_causal``, same validation: odd kernels,
``kernel_size · dilation ≤`` the axis length) plus ``stride`` (int or tuple, default 1; ``1 ≤ stride ≤ kernel_size``
as in NATTEN). Self-attention only; GQA supported.

Fast path ``torch`` (:func:`torch_tiled`): :func:`attnzoo.kernels.band.neighborhood_tiles`, per axis and dilation
group, tiles of consecutive group positions whose size is a multiple of the stride (1-D: 128, 2-D: 8×16, 3-D: 4×4×8,
rounded down to a multiple of ``s``, at least ``s``). Because a tile holds whole stride groups, its queries' windows
lie in the ``tile + k − 1`` positions from its first query's window start, so the band tiling of P2 covers them; the
tile mask is the predicate. N-d tiles are per-axis products; one batched SDPA per chunk. Work
``≈ N · Π(t_a + k_a − 1)``, memory ``O(chunk · W · d)``. Fast path ``flex`` (:func:`flex_block_mask`): FlexAttention
with the predicate's block mask (cached), forward only on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels import flex
from attnzoo.kernels.band import cached_tiling, neighborhood_tiles, tiled_attention
from attnzoo.masks.neighborhood import generalized_neighborhood as gna_mod
from attnzoo.methods.checks import NATTEN_PARAMS, layout_shape, per_axis_causal, per_axis_ints, per_axis_values
from attnzoo.methods.common import mask_reference
from attnzoo.registry import SELF_PATTERNS, Backend, Call, MethodSpec, Param, TestHints, register

# layout, kernel, stride, dilation, causal
Axes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]


def _check_stride(value: Any, call: Call) -> str | None:
    stride = per_axis_ints("stride", value, call, 1)
    if isinstance(stride, str):
        return stride
    kernel = per_axis_ints("kernel_size", call.params.get("kernel_size", 7), call, 1)
    if stride and not isinstance(kernel, str) and any(s > k for s, k in zip(stride, kernel, strict=True)):
        return f"stride <= kernel_size on every axis (kernel_size {call.params.get('kernel_size', 7)})"
    return None


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    k = min(call.seq_q, 7)
    k -= k % 2 == 0
    return {"kernel_size": k, "stride": int(torch.randint(1, k + 1, (1,), generator=generator))}


SPEC = MethodSpec(
    name="generalized_neighborhood",
    family="structured",
    mechanism="P3",
    paper="Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light",
    arxiv="2504.16922",
    summary="neighborhood attention with a stride: stride groups of queries share their leader's window (NATTEN GNA)",
    exact=True,
    patterns=SELF_PATTERNS,
    params=(
        *NATTEN_PARAMS[:1],
        Param("stride", (int, tuple), 1, "stride per axis: queries in a stride group share one window (<= kernel)",
              low=1, check=_check_stride),
        *NATTEN_PARAMS[1:],
    ),
    complexity="O(N·Π(t+k−1)·d) time with tiles t (≈ N·k·d), O(N·d) memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
)


def _axes(seq: int, causal: bool, kernel_size: Any, stride: Any, dilation: Any, layout: Any, is_causal: Any) -> Axes:
    """The call's configuration, per axis: it fixes the mask (and keys its cached tiling and block mask)."""
    shape = layout_shape(seq, layout)
    ndim = len(shape)
    return (shape, per_axis_values(kernel_size, ndim), per_axis_values(stride, ndim), per_axis_values(dilation, ndim),
            per_axis_causal(causal, is_causal, ndim))


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, kernel_size: Any, stride: Any, dilation: Any, layout: Any, is_causal: Any,
) -> torch.Tensor:
    axes = _axes(q.shape[2], causal, kernel_size, stride, dilation, layout, is_causal)
    return mask_reference(q, k, v, gna_mod(*axes), scale, mask, bias)


def torch_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, kernel_size: Any, stride: Any, dilation: Any, layout: Any, is_causal: Any,
) -> torch.Tensor:
    axes = _axes(q.shape[2], causal, kernel_size, stride, dilation, layout, is_causal)
    tiling = cached_tiling(("generalized_neighborhood", axes), q.device, lambda: neighborhood_tiles(*axes))
    return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias)


def flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, kernel_size: Any, stride: Any, dilation: Any, layout: Any, is_causal: Any,
) -> torch.Tensor:
    axes = _axes(q.shape[2], causal, kernel_size, stride, dilation, layout, is_causal)
    return flex.mask_attention(q, k, v, scale=scale, key=("generalized_neighborhood", axes), mod=gna_mod(*axes))


register(SPEC, reference, [Backend("torch", torch_tiled), Backend("flex", flex_block_mask, flex.unavailable_masked)])
