"""P4 — axial attention: attention along one axis of an N-d layout, or along every axis in sequence.

Paper: "Axial Attention in Multidimensional Transformers" (Ho et al., arXiv:1912.12180).

Formula as implemented: the sequence is a row-major grid of shape ``layout`` (default ``(seq,)``). Attention along
axis ``a`` is softmax attention restricted to the tokens that share every other coordinate (with ``causal=True``, also
``x_a(j) ≤ x_a(i)``, the paper's masked axial attention), ``A_a = softmax_masked(scale · Q Kᵀ)``. With ``axis=a`` the
output is ``A_a V``. With ``axis=None`` (default) the axes are applied in sequence, last axis first (rows, then
columns, as in the paper's figure): ``O = A_0 ( … A_{n−1} V)`` — the same queries and keys on every step, the previous
step's output as values; the composed weights give every token a full receptive field in ``n`` steps. Choice: the
projections between steps belong to the layer, not to this function. Self-attention only; no user mask or bias (the
axial structure is the mask); GQA supported.

Fast path ``sdpa`` (:func:`sdpa_lines`): the grid is permuted so that the chosen axis is the sequence axis and every
other axis joins the batch: one batched ``scaled_dot_product_attention`` per step (``is_causal`` for causal),
O(N · L_a · d) time per step, no mask tensor. The predicate (:func:`attnzoo.masks.layouts.axial`) defines the reference.

Log-sum-exp (``return_lse=True``): one stage (``axis`` given, or a 1-D layout) is one softmax over the query's line,
so its row log-sum-exp is returned (:func:`attnzoo.kernels.dense.attention_lse` on the batched lines); several
stages compose softmaxes (each stage's values are the previous stage's outputs), which have no single log-sum-exp,
so that call is refused naming ``return_lse``.

Decoding (:data:`DECODER`, causal): ``layout`` is the shape of the *whole* decoded sequence (tokens arrive in
row-major order; the prompt is its start, a step past its end is refused naming ``layout``). A causal axial stage
only reads earlier tokens, so each token's stage outputs are final when it arrives: the cache stores, per slot, the
key (repeated to every query head, since later stages' values have one row per query head) and the values of every
stage, ``[v, A_{n−1}V, …]`` side by side (``n·Dv`` features). A step takes the new query's logits over the cached
keys and its own once, and for each stage a softmax over the slots the forward's predicate shows it (same
coordinates on the other axes, not after it on the stage's axis), the new token's own value being the previous
stage's output just computed; then it appends the token with all its stage values. The cache keeps every slot
(a column stage looks back a whole image row per step). :func:`decode_prefill` runs the stages over the prompt
(:func:`sdpa_lines`' batched lines for a prompt that is the whole layout, else SDPA with the predicate's mask, O(S²)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo import masks
from attnzoo.errors import fail
from attnzoo.kernels.dense import attention_lse
from attnzoo.kv.cache import KVCache
from attnzoo.masks.layouts import axial as axial_mod
from attnzoo.methods.checks import check_layout, layout_shape
from attnzoo.methods.common import Output, dense_scores, repeat_kv, row_lse, safe_softmax
from attnzoo.registry import SELF_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, register


def _check_axis(value: Any, call: Call) -> str | None:
    layout = call.params.get("layout")
    if value is None or check_layout(layout, call) is not None:
        return None
    ndim = 1 if layout is None else len(layout)
    return None if -ndim <= value < ndim else f"an axis of the {ndim}-d layout (in [{-ndim}, {ndim}))"


SPEC = MethodSpec(
    name="axial",
    family="structured",
    mechanism="P4",
    paper="Axial Attention in Multidimensional Transformers",
    arxiv="1912.12180",
    summary="attention along one axis of an N-d layout, or along every axis in sequence",
    exact=True,
    patterns=SELF_PATTERNS,
    params=(
        Param("layout", (tuple,), None, "spatial shape of the sequence; None means (seq,)", check=check_layout),
        Param("axis", (int,), None, "the axis to attend along; None: every axis in sequence, last first",
              check=_check_axis),
    ),
    complexity="O(N·L_a·d) time per axis, O(N·d) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    lse=True,
)


def _axes(seq: int, layout: tuple[int, ...] | None, axis: int | None) -> tuple[tuple[int, ...], list[int]]:
    shape = layout_shape(seq, layout)
    ndim = len(shape)
    return shape, list(range(ndim - 1, -1, -1)) if axis is None else [axis % ndim]


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: tuple[int, ...] | None, axis: int | None, return_lse: bool = False,
) -> Output:
    b, h, n, _ = q.shape
    shape, order = _axes(n, layout, axis)
    if return_lse:
        _one_stage(order)
    s = dense_scores(q, k, scale)
    out = repeat_kv(v, h)
    for a in order:
        seen = masks.dense(axial_mod(shape, a, causal), b, h, n, n, q.device)
        out = safe_softmax(s, seen) @ out
    return (out, row_lse(s, seen)) if return_lse else out


def _one_stage(order: list[int]) -> int:
    """The axis of a one-stage call; a call of several stages has no log-sum-exp (refused naming ``return_lse``)."""
    if len(order) > 1:
        raise fail("return_lse", "False for axial attention over several axes (axis=None with a multi-axis layout): "
                   "its output composes one softmax per axis, which has no single log-sum-exp; pass axis", True)
    return order[0]


def _to_lines(x: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """``(B, H, N, D)`` → ``(B · Π_{other axes}, H, L_axis, D)``."""
    b, h, _, d = x.shape
    grid = x.reshape(b, h, *shape, d).movedim(axis + 2, -2).movedim(1, -3)  # (B, others…, H, L_a, D)
    return grid.reshape(-1, h, shape[axis], d)


def _from_lines(y: torch.Tensor, b: int, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    h, d = y.shape[1], y.shape[-1]
    others = [n for i, n in enumerate(shape) if i != axis]
    grid = y.reshape(b, *others, h, shape[axis], d).movedim(-3, 1).movedim(-2, axis + 2)
    return grid.reshape(b, h, -1, d)


def sdpa_lines(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: tuple[int, ...] | None, axis: int | None, return_lse: bool = False,
) -> Output:
    shape, order = _axes(q.shape[2], layout, axis)
    if not return_lse:
        return _stage_outputs(q, k, v, scale, causal, shape, order)[-1]
    a, b = _one_stage(order), q.shape[0]
    y, lse = attention_lse(_to_lines(q, shape, a), _to_lines(k, shape, a), _to_lines(v, shape, a), causal=causal,
                           scale=scale, mask=None, bias=None)
    return _from_lines(y, b, shape, a), _from_lines(lse.unsqueeze(-1), b, shape, a).squeeze(-1)


def _stage_outputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, shape: tuple[int, ...],
    order: list[int],
) -> list[torch.Tensor]:
    """The output of every stage. Tokens that fill ``shape`` run as batched lines; fewer (a decoded prompt, the start
    of the grid) run as one SDPA with the stage's predicate as mask."""
    b, h, n, _ = q.shape
    outs, out = [], v
    for step, a in enumerate(order):
        keys = k if step == 0 else repeat_kv(k, h)  # later steps' values have every query head
        gqa = keys.shape[1] != h
        if math.prod(shape) == n:
            y = F.scaled_dot_product_attention(_to_lines(q, shape, a), _to_lines(keys, shape, a),
                                               _to_lines(out, shape, a), is_causal=causal, scale=scale, enable_gqa=gqa)
            out = _from_lines(y, b, shape, a)
        else:
            seen = masks.dense(axial_mod(shape, a, causal), 1, 1, n, n, q.device)
            out = F.scaled_dot_product_attention(q, keys, out, attn_mask=seen, scale=scale, enable_gqa=gqa)
        outs.append(out)
    return outs


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, layout: tuple[int, ...] | None,
    axis: int | None, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal axial attention over a (right-padded) prompt, the start of the layout; the cache of its keys and of
    every stage's values."""
    h = q.shape[1]
    shape, order = _axes(q.shape[2] if layout is None else math.prod(layout), layout, axis)
    outs = _stage_outputs(q, k, v, scale, True, shape, order)
    values = torch.cat([repeat_kv(v, h), *outs[:-1]], dim=-1)
    return outs[-1], KVCache.from_prompt(repeat_kv(k, h), values, lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    layout: tuple[int, ...] | None, axis: int | None,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: every stage over the cached slots and the token itself, then append it."""
    b, h = q.shape[:2]
    dv = v.shape[-1]
    shape, order = _axes(int(cache.length.max()) + 1 if layout is None else math.prod(layout), layout, axis)
    k_new, out = repeat_kv(k, h), repeat_kv(v, h)
    logits = torch.cat([cache.scores(q, scale), (q * k_new).sum(-1, keepdim=True) * scale], dim=-1)
    rows = torch.arange(b, device=q.device).view(-1, 1, 1, 1), torch.arange(h, device=q.device).view(1, -1, 1, 1)
    position = cache.length.view(-1, 1, 1, 1)
    occupied = cache.visible_to(position, h)
    itself = torch.ones_like(occupied[..., :1])
    stage_values = [out]
    for stage, a in enumerate(order):
        seen = occupied & axial_mod(shape, a, True)(*rows, position, cache.key_positions(h).long())
        p = safe_softmax(logits, torch.cat([seen, itself], dim=-1))
        out = p[..., :-1] @ cache.values[..., stage * dv : (stage + 1) * dv] + p[..., -1:] * out
        stage_values.append(out)
    return out, cache.append(k_new, torch.cat(stage_values[:-1], dim=-1))


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)


register(SPEC, reference, [Backend("sdpa", sdpa_lines, lse=True)], DECODER)
