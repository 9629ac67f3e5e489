"""S2 — sigmoid attention.

Paper: "Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram et al., arXiv:2409.04431).

Formula as implemented: ``O = (σ(scale · Q Kᵀ + bias + b) ⊙ M) V`` with ``M`` the 0/1 visibility (user mask,
bottom-right causal) and no row normalisation. ``b = sigmoid_bias`` defaults to ``−log(seq_kv)``, the paper's choice
that keeps the initial attention norm near that of softmax attention. A row with no visible key gives 0.

Fast path ``torch``: since rows are not normalised, any split of the work simply adds up. Query blocks of ``r`` rows
are computed as one ``matmul → sigmoid (in place) → matmul``, with ``r`` chosen so one block's scores stay under 2²²
elements (16 MiB in fp32, measured faster than larger blocks on a 2-core EPYC: the block stays in cache between
passes). Scale and ``b`` ride inside the first matmul on an extra feature
(``[scale·q, 1]·[k, b]ᵀ``), so the scores are touched only by the matmuls and the sigmoid; causal blocks stop at their
last visible key, halving the work (causal calls use at least ``CAUSAL_BLOCKS`` blocks so the skipped triangle is
most of the upper half). Blocks are checkpointed under autograd, so forward and backward memory are
O(r · Skv) instead of O(Sq · Skv). GQA stacks the query heads of a group as rows: no K/V copies.
"""

from __future__ import annotations

import math

import torch

from attnzoo import masks
from attnzoo.kernels.blockwise import grouped_logits, grouped_pv, query_blocks
from attnzoo.methods.common import dense_scores, repeat_kv, visible
from attnzoo.registry import ALL_PATTERNS, Backend, MethodSpec, Param, register

SCORES_PER_BLOCK = 1 << 22  # 16 MiB of fp32 scores per block: the block stays in cache between its passes
CAUSAL_BLOCKS = 16  # causal calls use at least this many blocks, so the skipped upper triangle is large

SPEC = MethodSpec(
    name="sigmoid",
    family="softmax",
    mechanism="S2",
    paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
    arxiv="2409.04431",
    summary="σ(QKᵀ·scale + b)V with no row normalisation; b = −log(seq_kv) by default",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(
        Param("sigmoid_bias", (float,), None, "the scalar b added to every logit; None means −log(seq_kv)"),
    ),
    complexity="O(N²d) time, O(N·r) memory (query blocks of r rows)",
    subquadratic_memory=True,
)


def _bias_value(sigmoid_bias: float | None, seq_kv: int) -> float:
    return -math.log(seq_kv) if sigmoid_bias is None else float(sigmoid_bias)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sigmoid_bias: float | None,
) -> torch.Tensor:
    s = dense_scores(q, k, scale) + _bias_value(sigmoid_bias, k.shape[2])
    if bias is not None:
        s = s + bias
    w = torch.sigmoid(s) * visible(causal, mask, q, k)
    return w @ repeat_kv(v, q.shape[1])


def blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sigmoid_bias: float | None,
) -> torch.Tensor:
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    offset = _bias_value(sigmoid_bias, skv)
    # Fold scale and b into one matmul: [scale·q, 1] · [k, b]ᵀ = scale·q·k + b (no extra pass over the scores).
    qa = torch.cat([q * scale, q.new_ones(b, h, sq, 1)], dim=-1)
    ka = torch.cat([k, k.new_full((b, k.shape[1], skv, 1), offset)], dim=-1)
    block = max(16, min(sq, SCORES_PER_BLOCK // (b * h * skv)))
    if causal:
        block = min(block, max(16, -(-sq // CAUSAL_BLOCKS)))

    def rows(q_rows: torch.Tensor, start: int) -> torch.Tensor:
        end = start + q_rows.shape[2]
        # Causal: rows [start, end) see no key past end - 1 + skv - sq, so those keys are never computed.
        kv_end = min(skv, end + skv - sq) if causal else skv
        if kv_end <= 0:
            return q_rows.new_zeros(b, h, end - start, v.shape[-1])
        s = grouped_logits(q_rows, ka[:, :, :kv_end], 1.0)
        if bias is not None:
            s = s + masks.rows(bias, start, end)[..., :kv_end]
        hidden = None if mask is None else ~masks.rows(mask, start, end)[..., :kv_end]
        if causal:
            past = ~masks.dense_rows(masks.causal(sq, skv), 1, 1, start, end, kv_end, q.device)
            hidden = past if hidden is None else hidden | past
        if hidden is not None:
            s = s.masked_fill_(hidden, float("-inf"))
        return grouped_pv(torch.sigmoid_(s), v[:, :, :kv_end])

    return query_blocks(rows, qa, block)


register(SPEC, reference, [Backend("torch", blockwise)])
