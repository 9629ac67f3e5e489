"""S9 — URPE: universal relative positional encoding attention.

Paper: "Your Transformer May Not be as Powerful as You Expect" (Luo, Li, Zheng, Liu, Wang, He; NeurIPS 2022;
arXiv:2205.13401). Code: github.com/lsj2408/URPE.

Softmax attention always yields a right-stochastic matrix, which the paper proves limits what RPE-based Transformers
can represent; URPE re-weights the attention matrix element-wise by a learnable Toeplitz matrix:

    O = (softmax(scale · Q Kᵀ + bias + M) ⊙ C) V,   C_ij = c_h[i − j]   (one coefficient vector per head)

- ``urpe_coeffs``: a ``(heads, 2·max_len − 1)`` tensor; entry ``m`` of row ``h`` is ``c_h[m − (max_len − 1)]``, i.e.
  relative distances ``−(max_len − 1) … max_len − 1``. Any ``max_len >= seq`` works (the centre column is distance 0).
  Learnable (``az.nn.Attention`` creates it with ``max_len`` from the layer's ``max_len`` parameter, default 1024),
  initialised to ones so that training starts from softmax attention; ``None`` (a plain call) means all ones.
- The additive relative-position bias of the paper's RPE backbones is the ``bias`` argument.
- Self-attention only (our choice): ``i − j`` is a relative position only when queries and keys index the same
  sequence; with ``seq_q != seq_kv`` there is no shared position axis to measure it on.
- A row with no visible key gives 0.

Fast path ``torch`` (:func:`torch_blockwise`): query blocks (``attnzoo.kernels.blocked_softmax``); each block takes its
band ``c_h[i − j]`` for ``i`` in the block as consecutive sliding windows of the reversed coefficients (a strided view
plus one flip, an ``(H, rows, N)`` tensor, never the ``(H, N, N)`` matrix), multiplies the softmax weights and then V.
Memory O(rows · N); autograd reaches ``urpe_coeffs`` through the view (blocks are recomputed in the backward pass). The
reference indexes the coefficients with the full ``(N, N)`` matrix of distances ``i − j``.

Log-sum-exp (``return_lse=True``): the softmax is one over each query's visible keys and the re-weighting is linear
in its weights, ``O_i = Σ_j e^{s_ij − L_i} (C_ij v_j)`` with ``L_i`` the row log-sum-exp of the logits, so ``L_i`` is
returned, and attention over disjoint key sets merges exactly by it (each key's value ``C_ij v_j`` depends on the pair
only, never on which other keys are present); the re-weighted rows do not sum to 1, which the merge never assumes.

Decoding (:data:`DECODER`): :func:`decode_prefill` runs :func:`torch_blockwise` causally over the prompt and caches
its keys and values; :func:`decode_step` appends the token, takes the softmax weights over the slots it sees, scales
slot ``j`` by ``c_h[p − p_j]`` (the true positions of the query and of the slot, so a pressed cache keeps its
distances) and combines the values. Every position must be below ``max_len`` of ``urpe_coeffs`` (each step is checked
against the sequence's length).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels.blocked_softmax import blocked_softmax_attention, inplace
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.methods.common import Output, dense_scores, repeat_kv, row_lse, safe_softmax, visible
from attnzoo.registry import SELF_PATTERNS, Backend, Call, Decoder, LayerInfo, MethodSpec, Param, TestHints, register

DEFAULT_MAX_LEN = 1024


def _check_coeffs(value: torch.Tensor, call: Call) -> str | None:
    want = f"a floating-point tensor of shape (heads={call.heads}, 2·max_len − 1) with max_len >= seq={call.length}"
    if value.dim() != 2 or value.shape[0] != call.heads or value.shape[1] % 2 == 0 or not value.is_floating_point():
        return want
    if (value.shape[1] + 1) // 2 < call.length:
        return want
    return None


def _init(layer: LayerInfo) -> torch.Tensor:
    max_len = layer.params.get("max_len") or DEFAULT_MAX_LEN
    return torch.ones(layer.heads, 2 * int(max_len) - 1)


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    max_len = call.seq_q + 2
    noise = torch.randn(call.heads, 2 * max_len - 1, generator=generator, dtype=torch.float64)
    return {"urpe_coeffs": (1.0 + 0.5 * noise).to(call.dtype)}


SPEC = MethodSpec(
    name="urpe",
    family="softmax",
    mechanism="S9",
    paper="Your Transformer May Not be as Powerful as You Expect",
    arxiv="2205.13401",
    summary="(softmax(QKᵀ·scale + bias) ⊙ C)V with C a learnable per-head Toeplitz matrix C_ij = c_h[i − j]",
    exact=True,
    patterns=SELF_PATTERNS,
    params=(
        Param(
            "urpe_coeffs", (torch.Tensor,), None,
            "(heads, 2·max_len − 1) Toeplitz coefficients c_h[d], d = −(max_len−1)…max_len−1; None = all ones",
            check=_check_coeffs, init=_init,
        ),
        Param("max_len", (int,), DEFAULT_MAX_LEN, "longest sequence the coefficients created by az.nn cover", low=1),
    ),
    complexity="O(N²d) time, O(N·r) memory (query blocks of r rows)",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    lse=True,
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, urpe_coeffs: torch.Tensor | None, max_len: int, return_lse: bool = False,
) -> Output:
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    seen = visible(causal, mask, q, k)
    p = safe_softmax(s, seen)
    if urpe_coeffs is not None:
        n = q.shape[2]
        centre = (urpe_coeffs.shape[1] - 1) // 2
        distance = torch.arange(n, device=q.device).view(-1, 1) - torch.arange(n, device=q.device).view(1, -1)
        toeplitz = urpe_coeffs.to(q.dtype)[:, distance + centre]  # (H, n, n): toeplitz[h, i, j] = c_h[i − j]
        p = p * toeplitz
    out = p @ repeat_kv(v, q.shape[1])
    return (out, row_lse(s, seen)) if return_lse else out


def torch_blockwise(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, urpe_coeffs: torch.Tensor | None, max_len: int, return_lse: bool = False,
) -> Output:
    if urpe_coeffs is None:
        return blocked_softmax_attention(q, k, v, scale=scale, causal=causal, mask=mask, bias=bias,
                                         return_lse=return_lse)
    coeffs = urpe_coeffs.to(q.dtype)
    centre = (coeffs.shape[1] - 1) // 2
    reversed_ = coeffs.flip(-1)  # reversed_[centre − d] = c[d]

    def reweight(p: torch.Tensor, start: int, end: int, reversed_: torch.Tensor) -> torch.Tensor:
        # Row i needs (c[i − j])_j = reversed_[centre − i + j], the window of reversed_ starting at centre − i: the
        # block's windows are consecutive, in reverse row order (a strided view, then one flip of the band).
        keys = p.shape[-1]
        windows = reversed_.unfold(-1, keys, 1)[:, centre - end + 1 : centre - start + 1]
        band = windows.flip(-2)
        return p.mul_(band) if inplace() else p * band

    return blocked_softmax_attention(
        q, k, v, scale=scale, causal=causal, mask=mask, bias=bias, prob_mod=reweight, hook_tensors=(reversed_,),
        return_lse=return_lse,
    )


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, urpe_coeffs: torch.Tensor | None,
    max_len: int, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal URPE attention over a (right-padded) prompt and the cache of its keys and values."""
    out = torch_blockwise(q, k, v, causal=True, scale=scale, mask=None, bias=None, urpe_coeffs=urpe_coeffs,
                          max_len=max_len)
    return out, KVCache.from_prompt(k, v, lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    urpe_coeffs: torch.Tensor | None, max_len: int,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: append, softmax over the slots it sees, reweight by ``c_h[p − p_j]``, combine."""
    cache = cache.append(k, v)
    if urpe_coeffs is None:
        return softmax_attention(cache, q, scale), cache
    heads = q.shape[1]
    q_pos = cache.query_positions(q.shape[2])
    seen = cache.visible_to(q_pos, heads)
    p = safe_softmax(cache.scores(q, scale), seen)
    centre = (urpe_coeffs.shape[1] - 1) // 2
    distance = (q_pos - cache.key_positions(heads)).clamp(0, centre).long()  # hidden slots: any valid index
    coeffs = urpe_coeffs.to(q.dtype)
    band = coeffs[torch.arange(heads, device=q.device).view(1, -1, 1, 1), centre + distance]
    return cache.combine(p * band), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("torch", torch_blockwise, lse=True)], DECODER)
