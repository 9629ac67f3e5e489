"""S1 — softmax attention, the baseline every other method is compared with.

Paper: "Attention Is All You Need" (Vaswani et al., arXiv:1706.03762).

Formula as implemented: ``O = softmax(scale · Q Kᵀ + bias + M) V`` where ``M`` is 0 where a key is visible and −inf
elsewhere (user mask and/or bottom-right causal mask); rows with no visible key give 0.

Fast path ``sdpa`` (:func:`sdpa_fused`): :func:`attnzoo.kernels.dense.sdpa_attention`, i.e.
``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa`` (no K/V copies). A plain causal self-attention
call uses ``is_causal=True`` (no mask tensor); other masks are materialised once as a boolean (or, with a bias, float)
mask. With ``return_lse=True`` it runs :func:`attnzoo.kernels.dense.attention_lse` instead (SDPA returns no
log-sum-exp): PyTorch's CPU flash kernel, whose backward also carries the log-sum-exp's gradient.

Decoding (:data:`DECODER`): :func:`decode_prefill` runs the causal SDPA path over the prompt and returns a
:class:`~attnzoo.kv.cache.KVCache` of its keys and values; :func:`decode_step` appends the tokens (one, or a
chunk) and attends over the cache (:func:`attnzoo.kv.attend.softmax_attention`: SDPA over the cached keys, no mask
tensor for a plain cache; a chunk is causal within itself through the positions).
"""

from __future__ import annotations

import torch

from attnzoo.kernels.dense import attention_lse, sdpa_attention
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.methods.common import Output, dense_scores, repeat_kv, softmax_rows, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Decoder, MethodSpec, register

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
    lse=True,
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, return_lse: bool = False,
) -> Output:
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    return softmax_rows(s, visible(causal, mask, q, k), repeat_kv(v, q.shape[1]), return_lse)


def sdpa_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, return_lse: bool = False,
) -> Output:
    if return_lse:
        return attention_lse(q, k, v, causal=causal, scale=scale, mask=mask, bias=bias)
    return sdpa_attention(q, k, v, causal=causal, scale=scale, mask=mask, bias=bias)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal attention over a (right-padded) prompt and the cache of its keys and values."""
    out = sdpa_attention(q, k, v, causal=True, scale=scale, mask=None, bias=None)
    return out, KVCache.from_prompt(k, v, lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
) -> tuple[torch.Tensor, KVCache]:
    """``T`` tokens per sequence: append their keys and values, attend over the cache (causal within the chunk)."""
    cache = cache.append(k, v)
    return softmax_attention(cache, q, scale), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True, chunked=True)

register(SPEC, reference, [Backend("sdpa", sdpa_fused, lse=True)], DECODER)
