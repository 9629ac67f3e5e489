"""S1 — softmax attention, the baseline every other method is compared with.

Paper: "Attention Is All You Need" (Vaswani et al., arXiv:1706.03762).

Formula as implemented: ``O = softmax(scale · Q Kᵀ + bias + M) V`` where ``M`` is 0 where a key is visible and −inf
elsewhere (user mask and/or bottom-right causal mask); rows with no visible key give 0.

Fast path ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa`` (no K/V copies). A plain
causal self-attention call uses ``is_causal=True`` (no mask tensor); other masks are materialised once as a boolean (or,
with a bias, float) mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnzoo import masks
from attnzoo.methods.common import dense_scores, repeat_kv, safe_softmax, visible
from attnzoo.registry import ALL_PATTERNS, Backend, MethodSpec, register

SPEC = MethodSpec(
    name="softmax",
    family="softmax",
    mechanism="S1",
    paper="Attention Is All You Need",
    arxiv="1706.03762",
    summary="softmax(QKᵀ·scale + bias + mask)V; the SDPA path",
    exact=True,
    patterns=ALL_PATTERNS,
    complexity="O(N²d) time; memory of the SDPA kernel (O(N) with the flash/efficient kernels)",
)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    p = safe_softmax(s, visible(causal, mask, q, k))
    return p @ repeat_kv(v, q.shape[1])


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if causal and mask is None and bias is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    attn_mask = masks.combine(causal, mask, q.shape[2], k.shape[2], q.device)
    if bias is not None:
        attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)


register(SPEC, reference, [Backend("sdpa", sdpa)])
