"""P5 — MaxViT block attention: attention inside non-overlapping ``P × P`` windows.

Paper: "MaxViT: Multi-Axis Vision Transformer" (Tu et al., arXiv:2204.01697). Multi-axis attention is block attention
followed by grid attention (:mod:`attnzoo.methods.local.maxvit_grid`), each its own layer with its own projections.

Formula as implemented: the sequence is a row-major grid of shape ``layout`` (default ``(seq,)``); each axis is cut
into windows of ``window_size`` (which must divide it, as in the paper); a query attends with softmax to the keys of
its window on every axis: ``x_q // P == x_k // P``. Default ``window_size=7`` (the paper's P = 7). Self-attention,
non-causal; no user mask or bias. The predicate is :func:`attnzoo.masks_local.window_partition`.

Fast path ``sdpa``: windows become batch entries by one permutation, one batched SDPA without a mask, one inverse
permutation (:func:`attnzoo.kernels.partition.partitioned_attention`): O(N·P^n·d) time, O(N·d) memory.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo import masks
from attnzoo.kernels.partition import partitioned_attention
from attnzoo.masks_local import window_partition
from attnzoo.methods.common import dense_scores, repeat_kv, safe_softmax
from attnzoo.methods.local.common import check_divisor, check_layout, layout_and_sizes, smallest_divisor
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    return {"window_size": smallest_divisor(call.seq_q)}


SPEC = MethodSpec(
    name="maxvit_block",
    family="local",
    mechanism="P5",
    paper="MaxViT: Multi-Axis Vision Transformer",
    arxiv="2204.01697",
    summary="attention inside non-overlapping P×P windows (MaxViT's block attention)",
    exact=True,
    patterns=frozenset({"self/noncausal"}),
    params=(
        Param("window_size", (int, tuple), 7, "window size per axis; must divide each axis", low=1,
              check=check_divisor("window_size")),
        Param("layout", (tuple,), None, "spatial shape of the sequence; None means (seq,)", check=check_layout),
    ),
    complexity="O(N·P^n·d) time, O(N·d) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, window_size: Any, layout: Any,
) -> torch.Tensor:
    b, h, n, _ = q.shape
    seen = masks.dense(window_partition(*layout_and_sizes(n, layout, window_size)), b, h, n, n, q.device)
    return safe_softmax(dense_scores(q, k, scale), seen) @ repeat_kv(v, h)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, window_size: Any, layout: Any,
) -> torch.Tensor:
    shape, window = layout_and_sizes(q.shape[2], layout, window_size)
    return partitioned_attention(q, k, v, scale=scale, layout=shape, inner=window, group="outer")


register(SPEC, reference, [Backend("sdpa", sdpa)])
