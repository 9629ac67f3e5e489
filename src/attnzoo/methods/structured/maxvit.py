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

Fast path ``sdpa`` (:func:`block_sdpa_partitioned`, :func:`grid_sdpa_partitioned`): windows (or grid groups) become
batch entries by one permutation, one batched SDPA without a mask, one inverse permutation
(:func:`attnzoo.kernels.partition.partitioned_attention`): O(N·P^n·d) time, O(N·d) memory.

Log-sum-exp (``return_lse=True``): each output is one softmax over the query's window (or grid group), so each
row's log-sum-exp is returned (the partition kernel's, through the same inverse permutation).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels.partition import partitioned_attention
from attnzoo.masks.partitions import grid, window_partition
from attnzoo.methods.checks import check_layout, divides_layout, layout_and_sizes, smallest_divisor
from attnzoo.methods.common import Output, mask_reference
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register


def _spec(name: str, size: str, letter: str, summary: str) -> MethodSpec:
    """The spec of one MaxViT axis; ``size`` names its size parameter, ``letter`` its symbol (P or G)."""

    def sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
        return {size: smallest_divisor(call.seq_q)}

    return MethodSpec(
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
                  check=divides_layout(size)),
            Param("layout", (tuple,), None, "spatial shape of the sequence; None means (seq,)", check=check_layout),
        ),
        complexity=f"O(N·{letter}^n·d) time, O(N·d) memory",
        supports_mask=False,
        supports_bias=False,
        subquadratic_memory=True,
        tests=TestHints(sample_params=sample_params),
        lse=True,
    )


BLOCK_SPEC = _spec("maxvit_block", "window_size", "P", "attention inside non-overlapping P×P windows (MaxViT's block "
                   "attention)")
GRID_SPEC = _spec("maxvit_grid", "grid_size", "G", "attention across a sparse G×G grid spanning the layout (MaxViT's "
                  "grid attention)")


def block_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, window_size: Any, layout: Any, return_lse: bool = False,
) -> Output:
    mod = window_partition(*layout_and_sizes(q.shape[2], layout, window_size))
    return mask_reference(q, k, v, mod, scale, mask, bias, return_lse)


def block_sdpa_partitioned(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, window_size: Any, layout: Any, return_lse: bool = False,
) -> Output:
    shape, p = layout_and_sizes(q.shape[2], layout, window_size)
    return partitioned_attention(q, k, v, scale=scale, layout=shape, inner=p, group="outer", return_lse=return_lse)


def grid_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, grid_size: Any, layout: Any, return_lse: bool = False,
) -> Output:
    mod = grid(*layout_and_sizes(q.shape[2], layout, grid_size))
    return mask_reference(q, k, v, mod, scale, mask, bias, return_lse)


def grid_sdpa_partitioned(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, grid_size: Any, layout: Any, return_lse: bool = False,
) -> Output:
    shape, g = layout_and_sizes(q.shape[2], layout, grid_size)
    inner = tuple(n // s for n, s in zip(shape, g, strict=True))
    return partitioned_attention(q, k, v, scale=scale, layout=shape, inner=inner, group="inner", return_lse=return_lse)


register(BLOCK_SPEC, block_reference, [Backend("sdpa", block_sdpa_partitioned, lse=True)])
register(GRID_SPEC, grid_reference, [Backend("sdpa", grid_sdpa_partitioned, lse=True)])
