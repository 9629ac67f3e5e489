"""P5 — MaxViT multi-axis attention: block attention (``maxvit_block``) and grid attention (``maxvit_grid``).

Paper: "MaxViT: Multi-Axis Vision Transformer" (Tu et al., arXiv:2204.01697). Multi-axis attention is block attention
followed by grid attention, each its own layer with its own projections, so the two are registered as two methods.

Formula as implemented: the sequence is a row-major grid of shape ``layout`` (default ``(seq,)``).
- ``maxvit_block``: each axis is cut into windows of ``window_size`` (which must divide it, as in the paper); a query
  attends with softmax to the keys of its window on every axis: ``x_q // P == x_k // P``
  (predicate :func:`attnzoo.masks.partitions.window_partition`).
- ``maxvit_grid``: each axis of length ``L`` is split as ``x = g · (L/G) + r`` with ``G = grid_size`` (which must
  divide it); tokens with the same ``r`` on every axis attend to each other — ``G`` tokens per axis, ``L/G`` apart (a
  dilated, global mixing) (predicate :func:`attnzoo.masks.partitions.grid`).
Defaults ``window_size=7`` and ``grid_size=7`` (the paper's P = G = 7). Self-attention, non-causal; no user mask or
bias.

Fast path ``sdpa``: windows (or grid groups) become batch entries by one permutation, one batched SDPA without a mask,
one inverse permutation (:func:`attnzoo.kernels.partition.partitioned_attention`): O(N·P^n·d) time, O(N·d) memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attnzoo import masks
from attnzoo.kernels.partition import partitioned_attention
from attnzoo.masks.partitions import grid, window_partition
from attnzoo.methods.common import dense_scores, repeat_kv, safe_softmax
from attnzoo.methods.structured.common import check_divisor, check_layout, layout_and_sizes, smallest_divisor
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register


def _register(
    name: str, size: str, letter: str, predicate: Callable[..., masks.MaskMod], group: str, summary: str
) -> None:
    """Register one MaxViT axis: ``size`` names its size parameter, ``group`` the partition SDPA batches over."""

    def sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
        return {size: smallest_divisor(call.seq_q)}

    spec = MethodSpec(
        name=name,
        family="structured",
        mechanism="P5",
        paper="MaxViT: Multi-Axis Vision Transformer",
        arxiv="2204.01697",
        summary=summary,
        exact=True,
        patterns=frozenset({"self/noncausal"}),
        params=(
            Param(size, (int, tuple), 7, f"{size.split('_')[0]} size per axis; must divide each axis", low=1,
                  check=check_divisor(size)),
            Param("layout", (tuple,), None, "spatial shape of the sequence; None means (seq,)", check=check_layout),
        ),
        complexity=f"O(N·{letter}^n·d) time, O(N·d) memory",
        supports_mask=False,
        supports_bias=False,
        subquadratic_memory=True,
        tests=TestHints(sample_params=sample_params),
    )

    def reference(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
        bias: torch.Tensor | None, layout: Any, **sizes: Any,
    ) -> torch.Tensor:
        b, h, n, _ = q.shape
        seen = masks.dense(predicate(*layout_and_sizes(n, layout, sizes[size])), b, h, n, n, q.device)
        return safe_softmax(dense_scores(q, k, scale), seen) @ repeat_kv(v, h)

    def sdpa(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
        bias: torch.Tensor | None, layout: Any, **sizes: Any,
    ) -> torch.Tensor:
        shape, p = layout_and_sizes(q.shape[2], layout, sizes[size])
        inner = p if group == "outer" else tuple(n // s for n, s in zip(shape, p, strict=True))
        return partitioned_attention(q, k, v, scale=scale, layout=shape, inner=inner, group=group)

    register(spec, reference, [Backend("sdpa", sdpa)])


_register("maxvit_block", "window_size", "P", window_partition, "outer",
          "attention inside non-overlapping P×P windows (MaxViT's block attention)")
_register("maxvit_grid", "grid_size", "G", grid, "inner",
          "attention across a sparse G×G grid spanning the layout (MaxViT's grid attention)")
