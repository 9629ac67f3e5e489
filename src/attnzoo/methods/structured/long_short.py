"""P9 — CrossFormer long/short distance attention (LSDA): attention within groups of adjacent or of strided tokens.

Paper: "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention" (Wang et al., arXiv:2108.00154).
LSDA alternates two kinds of layer; this method is one layer, ``distance`` choosing which.

Formula as implemented: the sequence is a row-major grid of shape ``layout`` (default ``(seq,)``, 1-D to N-d); the
tokens are split into groups and each token attends with softmax to the tokens of its group, ``O_i = Σ_{j∈G(i)}
softmax_j(scale · q_i·k_j) v_j``:

- ``distance="short"`` (SDA): groups of ``G`` adjacent tokens per axis (``G = group_size``): ``x_i // G = x_j // G`` on
  every axis (the paper's ``G × G`` windows of adjacent embeddings);
- ``distance="long"`` (LDA): tokens sampled with a fixed interval ``I = interval`` per axis: ``x_i mod I = x_j mod I``
  on every axis, so a group holds ``L/I`` tokens per axis spread over the whole layout (the paper's ``S/I × S/I``
  groups).

The predicates are :func:`attnzoo.masks.partitions.window_partition` (short) and
:func:`attnzoo.masks.partitions.grid` with
``L / I`` grid cells (long), the same groupings MaxViT's block/grid attention use. Defaults: the paper's ``G = 7``
and ``I = 8`` (its first stage: 56×56 tokens, groups of 7×7 either way). Choice: the paper pads the feature map to a
multiple of ``G`` / ``I``; here the size must divide every axis (an error otherwise) so no padded token takes part.
Only the size ``distance`` uses is checked. Self-attention, non-causal; no user mask or bias; GQA supported.

Fast path ``sdpa`` (:func:`sdpa_partitioned`): one permutation that makes every group a contiguous batch entry, one
batched SDPA without a mask, the inverse permutation (:func:`attnzoo.kernels.partition.partitioned_attention`):
O(N·|group|·d) time, O(N·d) memory.

Log-sum-exp (``return_lse=True``): the output is one softmax over the query's group of (original) tokens, so each
row's log-sum-exp is returned (the partition kernel's, through the same inverse permutation).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels.partition import partitioned_attention
from attnzoo.masks import MaskMod
from attnzoo.masks.partitions import grid, window_partition
from attnzoo.methods.checks import check_layout, divides_layout, layout_and_sizes, smallest_divisor
from attnzoo.methods.common import Output, mask_reference
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register


def _check_size(name: str, distance: str) -> Any:
    divides = divides_layout(name)

    def check(value: Any, call: Call) -> str | None:
        return divides(value, call) if call.params.get("distance", "short") == distance else None

    return check


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    distance = ("short", "long")[int(torch.randint(0, 2, (1,), generator=generator))]
    size = smallest_divisor(call.seq_q)
    return {"distance": distance, "group_size": size, "interval": size}


SPEC = MethodSpec(
    name="long_short",
    family="structured",
    mechanism="P9",
    paper="CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention",
    arxiv="2108.00154",
    summary="CrossFormer LSDA: attention within groups of adjacent (short) or interval-strided (long) tokens",
    exact=True,
    patterns=frozenset({"self/noncausal"}),
    params=(
        Param("distance", (str,), "short", "'short' (SDA: adjacent groups) or 'long' (LDA: strided groups)",
              choices=("short", "long")),
        Param("group_size", (int, tuple), 7, "SDA group size G per axis; must divide each axis", low=1,
              check=_check_size("group_size", "short")),
        Param("interval", (int, tuple), 8, "LDA sampling interval I per axis; must divide each axis", low=1,
              check=_check_size("interval", "long")),
        Param("layout", (tuple,), None, "spatial shape of the sequence; None means (seq,)", check=check_layout),
    ),
    complexity="O(N·|group|·d) time, O(N·d) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
    lse=True,
)


def _predicate(seq: int, distance: str, group_size: Any, interval: Any, layout: Any) -> MaskMod:
    if distance == "short":
        return window_partition(*layout_and_sizes(seq, layout, group_size))
    shape, step = layout_and_sizes(seq, layout, interval)
    return grid(shape, tuple(n // i for n, i in zip(shape, step, strict=True)))


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, distance: str, group_size: Any, interval: Any, layout: Any, return_lse: bool = False,
) -> Output:
    mod = _predicate(q.shape[2], distance, group_size, interval, layout)
    return mask_reference(q, k, v, mod, scale, mask, bias, return_lse)


def sdpa_partitioned(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, distance: str, group_size: Any, interval: Any, layout: Any, return_lse: bool = False,
) -> Output:
    shape, inner = layout_and_sizes(q.shape[2], layout, group_size if distance == "short" else interval)
    group = "outer" if distance == "short" else "inner"
    return partitioned_attention(q, k, v, scale=scale, layout=shape, inner=inner, group=group, return_lse=return_lse)


register(SPEC, reference, [Backend("sdpa", sdpa_partitioned, lse=True)])
