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

Decoding (:data:`DECODER`, every axis causal; also P2's): tokens arrive in row-major order and a causal window only
looks back, at most ``Σ_a (k_a − 1)·d_a`` steps along each axis, i.e. ``R = Σ_a (k_a − 1)·d_a·r_a`` flat positions
(``r_a`` the row-major stride of axis ``a``). The cache is a ring of ``R + 1`` slots when that is at most half the
whole sequence (always for a 1-D sequence without ``layout``: memory O(k·d) whatever the context), else a full cache.
Each slot's visibility is the forward's predicate on its position (:func:`attnzoo.kv.attend.masked_step`).

- ``layout`` is the shape of the *whole* decoded sequence (an image generated in raster order, say): the prompt is
  its first tokens, steps fill the rest, and a step past its end is refused (naming ``layout``). Without ``layout`` a
  1-D sequence grows without end.
- A stride group's causal window starts from its leader, which at the end of an axis is clamped to the last
  position: it depends on where the sequence ends. With ``stride > 1`` decoding therefore needs ``layout`` (a 1-D
  ``(N,)`` for a sequence of ``N`` tokens) and refuses ``None`` naming it.
- :func:`decode_prefill` runs :func:`torch_tiled` over a prompt that is the whole layout (or has none); a prompt that
  is only the start of a layout is attended densely with the predicate (O(S²) for ``S`` prompt tokens).

Log-sum-exp (``return_lse=True``): the output is one softmax over each query's strided neighborhood, so each
row's log-sum-exp is returned (the tiled kernel's per-tile one; FlexAttention's on GPU).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kernels import flex
from attnzoo.kernels.band import cached_tiling, neighborhood_tiles, tiled_attention
from attnzoo.kv.attend import masked_step
from attnzoo.kv.cache import KVCache
from attnzoo.masks.layouts import strides
from attnzoo.masks.neighborhood import generalized_neighborhood as gna_mod
from attnzoo.methods.checks import NATTEN_PARAMS, layout_shape, per_axis_causal, per_axis_ints, per_axis_values
from attnzoo.methods.common import Output, mask_reference
from attnzoo.registry import SELF_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register

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


def at_reach(call: Call, fraction: float) -> dict[str, Any]:
    """The odd ``kernel_size`` nearest ``fraction · seq_kv`` (rounded up to odd; at least 1): one sequence axis."""
    reach = max(1, round(call.seq_kv * fraction))
    return {"kernel_size": reach if reach % 2 else reach + 1}


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
    tests=TestHints(sample_params=_sample_params,
                    decoding_params=lambda call, params, prompt: {"layout": (call.seq_q,)}),
    lse=True,
    at_reach=at_reach,
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
    return_lse: bool = False,
) -> Output:
    axes = _axes(q.shape[2], causal, kernel_size, stride, dilation, layout, is_causal)
    return mask_reference(q, k, v, gna_mod(*axes), scale, mask, bias, return_lse)


def torch_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, kernel_size: Any, stride: Any, dilation: Any, layout: Any, is_causal: Any,
    return_lse: bool = False,
) -> Output:
    axes = _axes(q.shape[2], causal, kernel_size, stride, dilation, layout, is_causal)
    tiling = cached_tiling(("generalized_neighborhood", axes), q.device, lambda: neighborhood_tiles(*axes))
    return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias, return_lse=return_lse)


def flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, kernel_size: Any, stride: Any, dilation: Any, layout: Any, is_causal: Any,
    return_lse: bool = False,
) -> Output:
    axes = _axes(q.shape[2], causal, kernel_size, stride, dilation, layout, is_causal)
    return flex.mask_attention(q, k, v, scale=scale, key=("generalized_neighborhood", axes), mod=gna_mod(*axes),
                               return_lse=return_lse)


def _decoded_axes(length: int, kernel_size: Any, stride: Any, dilation: Any, layout: Any, is_causal: Any) -> Axes:
    """The axes of a decoded sequence (every axis causal), ``length`` tokens long so far; ``stride > 1`` needs the
    whole sequence's ``layout``."""
    axes = _axes(length, True, kernel_size, stride, dilation, layout, is_causal)
    if layout is None and any(s > 1 for s in axes[2]):
        raise fail("layout", "the whole decoded sequence's shape when stride > 1 (a causal stride group's window "
                   "depends on where the sequence ends), e.g. (N,) for N tokens", None)
    return axes


def look_back(axes: Axes) -> int:
    """The farthest a causal query looks back, in flat positions: ``Σ_a (k_a − 1)·d_a·r_a``."""
    layout, kernel, _, dilation, _ = axes
    return sum((k - 1) * d * r for k, d, r in zip(kernel, dilation, strides(layout), strict=True))


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, kernel_size: Any, stride: Any,
    dilation: Any, layout: Any, is_causal: Any, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal (generalized) neighborhood attention over a (right-padded) prompt, the start of the sequence; the cache
    of the keys later tokens can still see."""
    n = q.shape[2]
    axes = _decoded_axes(n, kernel_size, stride, dilation, layout, is_causal)
    if math.prod(axes[0]) == n:
        out = torch_tiled(q, k, v, causal=True, scale=scale, mask=None, bias=None, kernel_size=kernel_size,
                          stride=stride, dilation=dilation, layout=layout, is_causal=is_causal)
    else:
        out = mask_reference(q, k, v, gna_mod(*axes), scale, None, None)
    reach = look_back(axes) + 1
    whole = None if layout is None else math.prod(layout)
    return out, KVCache.from_prompt(k, v, lengths, ring=reach if whole is None or 2 * reach <= whole else None)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, kernel_size: Any,
    stride: Any, dilation: Any, layout: Any, is_causal: Any,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: append, attend over the slots in its causal window."""
    axes = _decoded_axes(int(cache.length.max()) + 1, kernel_size, stride, dilation, layout, is_causal)
    return masked_step(cache, q, k, v, scale, gna_mod(*axes))


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("torch", torch_tiled, lse=True),
                           Backend("flex", flex_block_mask, flex.unavailable_masked, lse=True)],
         DECODER)
