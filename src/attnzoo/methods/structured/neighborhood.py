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

Fast path ``torch`` (:func:`torch_tiled`, :mod:`attnzoo.kernels.band`): per axis, each dilation group is cut into tiles
of consecutive group positions (1-D: 128; 2-D: 8×16; 3-D: 4×4×8); a tile sees a band of ``tile + k − 1`` positions on
each axis. N-d tiles are the products of per-axis tiles, their keys gathered and one batched SDPA with a tile mask runs
per chunk of tiles. Work ``≈ N · Π(t_a + k_a − 1)`` instead of ``N²``; memory O(chunk · W · d). Tilings are cached by
configuration. Fast path ``flex`` (:func:`flex_block_mask`): FlexAttention with the predicate's block mask (cached),
forward only on CPU.

Decoding (:data:`DECODER`, every axis causal): that of P3 with stride 1
(:func:`attnzoo.methods.structured.generalized_neighborhood.decode_prefill`): a ring of the ``Σ_a (k_a − 1)·d_a·r_a
+ 1`` last positions (a 1-D sequence: ``(k − 1)·d + 1`` slots, whatever the context), visibility from this predicate
on the slots' positions; ``layout`` is the shape of the whole decoded sequence, of which the prompt is the start.

Log-sum-exp (``return_lse=True``): the output is one softmax over each query's neighborhood, so each row's
log-sum-exp is returned (the tiled kernel's per-tile one; FlexAttention's on GPU).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels import flex
from attnzoo.kernels.band import cached_tiling, neighborhood_tiles, tiled_attention
from attnzoo.kv.cache import KVCache
from attnzoo.masks.neighborhood import neighborhood as neighborhood_mod
from attnzoo.methods.checks import NATTEN_PARAMS, layout_shape, per_axis_causal, per_axis_values
from attnzoo.methods.common import Output, mask_reference
from attnzoo.methods.structured import generalized_neighborhood as gna
from attnzoo.registry import SELF_PATTERNS, Backend, Call, Decoder, MethodSpec, TestHints, register

Axes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]  # layout, kernel, dilation, causal


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
    params=NATTEN_PARAMS,
    complexity="O(N·Π(t+k−1)·d) time with tiles t (≈ N·k·d), O(N·d) memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
    lse=True,
    at_reach=gna.at_reach,
)


def _axes(seq: int, causal: bool, kernel_size: Any, dilation: Any, layout: Any, is_causal: Any) -> Axes:
    """The call's configuration, per axis: it fixes the mask (and keys its cached tiling and block mask)."""
    shape = layout_shape(seq, layout)
    ndim = len(shape)
    return (shape, per_axis_values(kernel_size, ndim), per_axis_values(dilation, ndim),
            per_axis_causal(causal, is_causal, ndim))


def _tiles(axes: Axes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The band tiling: :func:`attnzoo.kernels.band.neighborhood_tiles` with stride 1 on every axis."""
    layout, kernel, dilation, causal = axes
    return neighborhood_tiles(layout, kernel, (1,) * len(layout), dilation, causal)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, kernel_size: Any, dilation: Any, layout: Any, is_causal: Any, return_lse: bool = False,
) -> Output:
    axes = _axes(q.shape[2], causal, kernel_size, dilation, layout, is_causal)
    return mask_reference(q, k, v, neighborhood_mod(*axes), scale, mask, bias, return_lse)


def torch_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, kernel_size: Any, dilation: Any, layout: Any, is_causal: Any, return_lse: bool = False,
) -> Output:
    axes = _axes(q.shape[2], causal, kernel_size, dilation, layout, is_causal)
    tiling = cached_tiling(("neighborhood", axes), q.device, lambda: _tiles(axes))
    return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias, return_lse=return_lse)


def flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, kernel_size: Any, dilation: Any, layout: Any, is_causal: Any, return_lse: bool = False,
) -> Output:
    axes = _axes(q.shape[2], causal, kernel_size, dilation, layout, is_causal)
    return flex.mask_attention(q, k, v, scale=scale, key=("neighborhood", axes), mod=neighborhood_mod(*axes),
                               return_lse=return_lse)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, kernel_size: Any, dilation: Any,
    layout: Any, is_causal: Any, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """P3's prefill with stride 1."""
    return gna.decode_prefill(q, k, v, scale=scale, kernel_size=kernel_size, stride=1, dilation=dilation,
                              layout=layout, is_causal=is_causal, lengths=lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, kernel_size: Any,
    dilation: Any, layout: Any, is_causal: Any,
) -> tuple[torch.Tensor, KVCache]:
    """P3's step with stride 1."""
    return gna.decode_step(cache, q, k, v, scale=scale, kernel_size=kernel_size, stride=1, dilation=dilation,
                           layout=layout, is_causal=is_causal)


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("torch", torch_tiled, lse=True),
                           Backend("flex", flex_block_mask, flex.unavailable_masked, lse=True)],
         DECODER)
