"""P5 — MaxViT grid attention: attention across a sparse ``G × G`` grid spanning the whole layout.

Paper: "MaxViT: Multi-Axis Vision Transformer" (Tu et al., arXiv:2204.01697). Multi-axis attention is block attention
(:mod:`attnzoo.methods.local.maxvit_block`) followed by grid attention, each its own layer.

Formula as implemented: the sequence is a row-major grid of shape ``layout`` (default ``(seq,)``); each axis of
length ``L`` is split as ``x = g · (L/G) + r`` with ``G = grid_size`` (which must divide it); tokens with the same
``r`` on every axis attend to each other with softmax — ``G`` tokens per axis, ``L/G`` apart (a dilated, global mixing).
Default ``grid_size=7`` (the paper's G = 7). Self-attention, non-causal; no user mask or bias. The predicate is
:func:`attnzoo.masks_local.grid`.

Fast path ``sdpa``: grid groups become batch entries by one permutation, one batched SDPA without a mask, one inverse
permutation (:func:`attnzoo.kernels.partition.partitioned_attention`): O(N·G^n·d) time, O(N·d) memory.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo import masks
from attnzoo.kernels.partition import partitioned_attention
from attnzoo.masks_local import grid
from attnzoo.methods.common import dense_scores, repeat_kv, safe_softmax
from attnzoo.methods.local.common import check_divisor, check_layout, layout_and_sizes, smallest_divisor
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    return {"grid_size": smallest_divisor(call.seq_q)}


SPEC = MethodSpec(
    name="maxvit_grid",
    family="local",
    mechanism="P5",
    paper="MaxViT: Multi-Axis Vision Transformer",
    arxiv="2204.01697",
    summary="attention across a sparse G×G grid spanning the layout (MaxViT's grid attention)",
    exact=True,
    patterns=frozenset({"self/noncausal"}),
    params=(
        Param("grid_size", (int, tuple), 7, "grid size per axis; must divide each axis", low=1,
              check=check_divisor("grid_size")),
        Param("layout", (tuple,), None, "spatial shape of the sequence; None means (seq,)", check=check_layout),
    ),
    complexity="O(N·G^n·d) time, O(N·d) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, grid_size: Any, layout: Any,
) -> torch.Tensor:
    b, h, n, _ = q.shape
    seen = masks.dense(grid(*layout_and_sizes(n, layout, grid_size)), b, h, n, n, q.device)
    return safe_softmax(dense_scores(q, k, scale), seen) @ repeat_kv(v, h)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, grid_size: Any, layout: Any,
) -> torch.Tensor:
    shape, g = layout_and_sizes(q.shape[2], layout, grid_size)
    inner = tuple(n // s for n, s in zip(shape, g, strict=True))
    return partitioned_attention(q, k, v, scale=scale, layout=shape, inner=inner, group="inner")


register(SPEC, reference, [Backend("sdpa", sdpa)])
