"""S7 — top-k sparse softmax attention.

Paper: "DLGSANet: Lightweight Dynamic Local and Global Self-Attention Networks for Image Super-Resolution"
(Li, Pan, Tang, Dong; ICCV 2023; arXiv:2301.02031), whose sparse global self-attention (SparseGSA) keeps only the
most useful query-key similarities. We implement that selection as the top-k of each query's logits (catalogue entry
S7), as also used by k-NN attention ("KVT: k-NN Attention for Boosting Vision Transformers", Wang et al.,
arXiv:2106.00515); we did not reproduce SparseGSA's exact sparsification or its image-specific layout.

Formula as implemented: with logits ``s_ij = scale · q_i·k_j + bias_ij`` over the keys ``j`` visible to query ``i``,
let ``t_i`` be the ``top_k``-th largest of them. Then ``O_i = Σ_j softmax_j(s_ij | s_ij ≥ t_i) v_j``: a softmax over the
kept logits only, every other key gets weight 0.

Choices:
- Ties at the threshold are all kept (a row may keep more than ``top_k`` keys when logits tie exactly); with fewer
  than ``top_k`` visible keys every visible key is kept, so ``top_k >= seq_kv`` is softmax attention.
- The selection is a hard mask: gradients flow to the kept logits only (the threshold itself is not differentiated).
- ``top_k`` defaults to 64 (our choice).

Fast path ``torch`` (:func:`torch_blockwise`): query blocks (``attnzoo.kernels.blocked_softmax``) compute one block of
logits, find each row's threshold with ``torch.topk`` (O(Skv) per row rather than a full sort), mask below it and
multiply the sparse weights with V; memory O(block · Skv), blocks are recomputed in the backward pass. The reference
sorts the dense score matrix.

No log-sum-exp (``return_lse``): which keys a query keeps depends on every key it sees, so attention over two halves
of the keys (each its own top k) merged by their log-sum-exps is not attention over the whole; an LSE would invite
such wrong merges.

Decoding (:data:`DECODER`): the cache keeps every key (any of them may be in a later query's top k).
:func:`decode_prefill` runs :func:`torch_blockwise` over the prompt; :func:`decode_step` appends the token, takes the
``top_k``-th largest logit among the slots it sees (``torch.topk``, O(L)) and attends over the slots at or above it
(:func:`attnzoo.kv.attend.softmax_attention` with those slots visible; a merged slot's ``log_weight`` counts in its
logit, so it ranks as the tokens it stands for).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels.blocked_softmax import blocked_softmax_attention, inplace
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.methods.common import dense_scores, repeat_kv, safe_softmax, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    return {"top_k": int(torch.randint(1, call.seq_kv + 1, (), generator=generator))}


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """``top_k = round(fraction · seq_kv)`` (at least 1) keys per query."""
    return {"top_k": max(1, round(call.seq_kv * fraction))}


SPEC = MethodSpec(
    name="topk",
    family="softmax",
    mechanism="S7",
    paper="DLGSANet: Lightweight Dynamic Local and Global Self-Attention Networks for Image Super-Resolution",
    arxiv="2301.02031",
    summary="keep the top_k largest logits of each query (among visible keys), softmax over them",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(Param("top_k", (int,), 64, "number of largest logits kept per query (all are kept if fewer)", low=1),),
    complexity="O(N²d) time, O(N·r) memory (query blocks of r rows)",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, top_k: int,
) -> torch.Tensor:
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    seen = visible(causal, mask, q, k)
    ranked = s.masked_fill(~seen, float("-inf")).sort(dim=-1, descending=True).values
    kth = min(top_k, s.shape[-1]) - 1
    threshold = ranked[..., kth : kth + 1]
    p = safe_softmax(s, seen & (s >= threshold))
    return p @ repeat_kv(v, q.shape[1])


def torch_blockwise(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, top_k: int,
) -> torch.Tensor:
    skv = k.shape[2]

    def keep_top(s: torch.Tensor) -> torch.Tensor:
        if top_k >= skv:
            return s
        threshold = torch.topk(s.detach(), top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        below = s < threshold
        return s.masked_fill_(below, float("-inf")) if inplace() else s.masked_fill(below, float("-inf"))

    return blocked_softmax_attention(q, k, v, scale=scale, causal=causal, mask=mask, bias=bias, select=keep_top)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, top_k: int,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal top-k attention over a (right-padded) prompt and the cache of its keys and values."""
    out = torch_blockwise(q, k, v, causal=True, scale=scale, mask=None, bias=None, top_k=top_k)
    return out, KVCache.from_prompt(k, v, lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, top_k: int,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: append, keep the slots whose logits reach the ``top_k``-th largest it sees."""
    cache = cache.append(k, v)
    s = cache.scores(q, scale)
    seen = cache.visible_to(cache.query_positions(q.shape[2]), q.shape[1])
    ranked = s.masked_fill(~seen, float("-inf"))
    threshold = torch.topk(ranked, min(top_k, cache.slots), dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return softmax_attention(cache, q, scale, visible=s >= threshold, scores=s), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("torch", torch_blockwise)], DECODER)
