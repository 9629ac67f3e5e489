"""P8 — blocked local attention with halo (HaloNets), 1-D/2-D/3-D.

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (Vaswani et al., arXiv:2103.12731).

Formula as implemented: the sequence is a row-major grid of shape ``layout`` (default ``(seq,)``), cut into
non-overlapping query blocks of ``block_size`` per axis (the last block of an axis may be shorter). Every query of a
block attends with softmax to the keys of its block widened by ``halo_size`` on each side of each axis, AND the user
mask; ``s = scale · q·k + bias``. Choice: at the grid borders the halo has no keys (the paper zero-pads the image;
here positions outside the grid simply do not exist, so no attention weight goes to padding). Self-attention,
non-causal (the paper's setting). Defaults: ``block_size=8``, ``halo_size=3`` (the paper's b=8, h=3). The predicate is
:func:`attnzoo.masks.windows.halo`.

Fast path ``torch`` (:func:`torch_tiled`): the tiles *are* the blocks; each sees ``block + 2·halo`` positions per axis
(shifted inside the grid at the borders, the mask hiding the extra ones), batched SDPA per chunk of tiles with a cached
tile mask (:mod:`attnzoo.kernels.band`; 1-D key ranges are strided views, N-d ones gathered). ``flex``
(:func:`flex_block_mask`): the predicate's cached block mask.

Log-sum-exp (``return_lse=True``): the output is one softmax over each query's block and its halo, so each row's
log-sum-exp is returned (the tiled kernel's per-tile one; FlexAttention's on GPU).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels import flex
from attnzoo.kernels.band import cached_tiling, product_tiles, tiled_attention
from attnzoo.masks.windows import halo as halo_mod
from attnzoo.masks.windows import halo_axis
from attnzoo.methods.checks import check_layout_3d, layout_shape, per_axis_check, per_axis_values
from attnzoo.methods.common import Output, mask_reference
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register

Axes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    return {"block_size": int(torch.randint(1, 6, (1,), generator=generator)),
            "halo_size": int(torch.randint(0, 3, (1,), generator=generator))}


SPEC = MethodSpec(
    name="halo",
    family="structured",
    mechanism="P8",
    paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
    arxiv="2103.12731",
    summary="non-overlapping query blocks attend to their block plus a halo of neighbouring positions",
    exact=True,
    patterns=frozenset({"self/noncausal"}),
    params=(
        Param("block_size", (int, tuple), 8, "query block size per axis", low=1,
              check=per_axis_check("block_size", 1)),
        Param("halo_size", (int, tuple), 3, "halo width per axis, on each side", low=0,
              check=per_axis_check("halo_size", 0)),
        Param("layout", (tuple,), None, "spatial shape of the sequence, 1 to 3 axes; None means (seq,)",
              check=check_layout_3d),
    ),
    complexity="O(N·Π(b+2h)·d) time, O(N·d) memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
    lse=True,
)


def _axes(seq: int, block_size: Any, halo_size: Any, layout: Any) -> Axes:
    """The call's configuration, per axis: it fixes the mask (and keys its cached tiling and block mask)."""
    shape = layout_shape(seq, layout)
    return shape, per_axis_values(block_size, len(shape)), per_axis_values(halo_size, len(shape))


def _axis_tiling(length: int, block: int, halo: int) -> tuple[torch.Tensor, ...]:
    n = -(-length // block)
    q_tiles = torch.arange(n * block).view(n, block)
    q_tiles = torch.where(q_tiles < length, q_tiles, -1)
    w = min(block + 2 * halo, length)
    lo = torch.clamp(torch.arange(n) * block - halo, min=0, max=length - w)
    k_tiles = lo.unsqueeze(1) + torch.arange(w)
    return q_tiles, k_tiles, halo_axis(q_tiles.unsqueeze(2), k_tiles.unsqueeze(1), block, halo)


def _tiling(axes: Axes) -> tuple[torch.Tensor, ...]:
    layout, block, halo = axes
    return product_tiles([_axis_tiling(*a) for a in zip(layout, block, halo, strict=True)], layout)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: Any, halo_size: Any, layout: Any, return_lse: bool = False,
) -> Output:
    axes = _axes(q.shape[2], block_size, halo_size, layout)
    return mask_reference(q, k, v, halo_mod(*axes), scale, mask, bias, return_lse)


def torch_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: Any, halo_size: Any, layout: Any, return_lse: bool = False,
) -> Output:
    axes = _axes(q.shape[2], block_size, halo_size, layout)
    tiling = cached_tiling(("halo", axes), q.device, lambda: _tiling(axes))
    return tiled_attention(q, k, v, scale=scale, tiling=tiling, mask=mask, bias=bias, return_lse=return_lse)


def flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: Any, halo_size: Any, layout: Any, return_lse: bool = False,
) -> Output:
    axes = _axes(q.shape[2], block_size, halo_size, layout)
    return flex.mask_attention(q, k, v, scale=scale, key=("halo", axes), mod=halo_mod(*axes), return_lse=return_lse)


register(SPEC, reference, [Backend("torch", torch_tiled, lse=True),
                           Backend("flex", flex_block_mask, flex.unavailable_masked, lse=True)])
