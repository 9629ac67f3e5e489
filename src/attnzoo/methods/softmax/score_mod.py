"""S8 — score modifiers: additive bias, ALiBi and logit soft-capping on softmax attention.

Common practice, with its sources:
- ALiBi: "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation" (Press, Smith,
  Lewis; arXiv:2108.12409): a per-head linear penalty ``−m_h · (i − j)`` on the logits.
- Logit soft-capping: Gemma 2 ("Gemma 2: Improving Open Language Models at a Practical Size", arXiv:2408.00118):
  ``cap · tanh(s / cap)`` on the scaled logits (cap 50 there).
- An additive bias tensor (relative-position bias tables, T5/Swin style, arrive here as ``bias``).

Formula as implemented, with ``s_ij = scale · q_i·k_j``:

    s'_ij = softcap · tanh(s_ij / softcap)        (if softcap > 0)
    s''_ij = s'_ij − m_h · |i + seq_kv − seq_q − j| + bias_ij      (ALiBi term if alibi is on)
    O = softmax(s'' + M) V

- The cap applies to the scaled logits before ALiBi and the bias, as in Gemma 2.
- ALiBi distances are bottom-right aligned (query ``i`` sits at key position ``i + seq_kv − seq_q``, the convention of
  the causal mask), so decoding a chunk over a KV cache gives the same biases as the full sequence. Under a causal
  mask every visible key has ``j <= i + seq_kv − seq_q``, so the term is the paper's ``−m(i − j)``. Without a causal
  mask we use the symmetric distance ``|i − j|`` (our choice; the paper defines ALiBi for causal LMs only).
- ``alibi=True`` uses the paper's slopes: for ``H`` a power of two, ``m_h = 2^(−8(h+1)/H)``, h = 0…H−1 (for H = 8:
  1/2, 1/4, …, 1/256); otherwise the paper's recipe: the slopes of the nearest lower power of two ``P`` followed by
  every other slope of ``2P``. A ``(heads,)`` tensor gives custom (possibly learnable) slopes.
- A row with no visible key gives 0.

Fast paths:
- ``flex`` (:func:`flex_score_mod`): FlexAttention with a ``score_mod`` (cap and slopes held in tensors, so new values
  reuse the compiled kernel) and a cached causal block mask that skips fully hidden key blocks; bias and user mask are
  read inside the ``score_mod``. Forward-only on CPU.
- ``torch`` (:func:`torch_blockwise`): query blocks (``attnzoo.kernels.blocked_softmax``) with autograd, for training on
  CPU; memory O(rows · Skv).

Log-sum-exp (``return_lse=True``): the output is one softmax over each query's visible keys, so the row log-sum-exp
of the modified logits ``s''`` is returned: by the query blocks (:mod:`attnzoo.kernels.blocked_softmax`) or by
FlexAttention's own (GPU only).

Decoding (:data:`DECODER`): :func:`decode_prefill` runs :func:`torch_blockwise` causally over the prompt and caches
its keys and values; :func:`decode_step` appends the token, takes the raw logits of every slot, caps them, subtracts
ALiBi with the distances of the slots' true positions (:func:`attnzoo.masks.mods.alibi` evaluated on
``cache.query_positions()`` and the slots' positions, so a pressed cache keeps true distances), adds a merged slot's
``log_weight``, and attends (:func:`attnzoo.kv.attend.softmax_attention` with these scores). With neither a cap nor
ALiBi the step is S1's (SDPA over the cache).
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo import masks
from attnzoo.kernels import flex
from attnzoo.kernels.blocked_softmax import blocked_softmax_attention, inplace
from attnzoo.kernels.blockwise import grouped_logits
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.masks import mods
from attnzoo.masks.mods import alibi_slopes
from attnzoo.methods.common import Output, dense_scores, repeat_kv, softmax_rows, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register


def _check_alibi(value: bool | torch.Tensor, call: Call) -> str | None:
    if isinstance(value, torch.Tensor) and (
        tuple(value.shape) != (call.heads,) or not value.is_floating_point()
    ):
        return f"False, True or a floating-point tensor of shape ({call.heads},) (one slope per head)"
    return None


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    slopes = torch.rand(call.heads, generator=generator, dtype=torch.float64).to(call.dtype)
    return {"alibi": slopes, "softcap": 2.0 + 3.0 * float(torch.rand((), generator=generator))}


SPEC = MethodSpec(
    name="score_mod",
    family="softmax",
    mechanism="S8",
    paper="common practice: ALiBi (arXiv:2108.12409), Gemma 2 logit soft-capping (arXiv:2408.00118), bias tensors",
    arxiv=None,
    summary="softmax(ALiBi(softcap(QKᵀ·scale)) + bias)V: additive bias, ALiBi slopes, tanh soft-capping",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(
        Param(
            "alibi", (bool, torch.Tensor), False,
            "False; True for the paper's slopes 2^(−8(h+1)/H); or a (heads,) tensor of slopes", check=_check_alibi,
        ),
        Param("softcap", (float,), 0.0, "0 = off; else logits become softcap·tanh(logits/softcap)", low=0.0),
    ),
    complexity="O(N²d) time; O(N·r) memory (torch query blocks) or FlexAttention's O(N)",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    lse=True,
)


def _slopes(alibi: bool | torch.Tensor, heads: int, like: torch.Tensor) -> torch.Tensor | None:
    if isinstance(alibi, torch.Tensor):
        return alibi.to(like.dtype)
    if alibi:
        return torch.tensor(alibi_slopes(heads), dtype=like.dtype, device=like.device)
    return None


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, alibi: bool | torch.Tensor, softcap: float, return_lse: bool = False,
) -> Output:
    h, sq, skv = q.shape[1], q.shape[2], k.shape[2]
    s = dense_scores(q, k, scale)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    slopes = _slopes(alibi, h, q)
    if slopes is not None:
        query_positions = torch.arange(skv - sq, skv, dtype=q.dtype, device=q.device).view(-1, 1)
        key_positions = torch.arange(skv, dtype=q.dtype, device=q.device).view(-1, 1)
        distance = torch.cdist(query_positions, key_positions, p=1.0)  # |i + skv − sq − j|
        s = s - slopes.view(1, h, 1, 1) * distance
    if bias is not None:
        s = s + bias
    return softmax_rows(s, visible(causal, mask, q, k), repeat_kv(v, h), return_lse)


def _distance_rows(start: int, end: int, offset: int, keys: int, like: torch.Tensor) -> torch.Tensor:
    """``|i + offset − j|`` for query rows ``[start, end)`` and keys ``[0, keys)``, in the dtype of ``like``.

    Positions are exact in fp32/fp64; half-precision logits get the distances rounded once, not their positions.
    """
    dtype = like.dtype if like.element_size() >= 4 else torch.float32
    rows = torch.arange(start + offset, end + offset, dtype=dtype, device=like.device).view(-1, 1)
    return (rows - torch.arange(keys, dtype=dtype, device=like.device).view(1, -1)).abs_().to(like.dtype)


def torch_blockwise(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, alibi: bool | torch.Tensor, softcap: float, return_lse: bool = False,
) -> Output:
    sq, skv = q.shape[2], k.shape[2]
    slopes = _slopes(alibi, q.shape[1], q)

    def modify(s: torch.Tensor, start: int, end: int, *hook_tensors: torch.Tensor) -> torch.Tensor:
        slopes = hook_tensors[0] if hook_tensors else None
        distance = None
        if slopes is not None:
            distance = _distance_rows(start, end, skv - sq, s.shape[-1], s)
        if inplace():
            if softcap > 0:
                s = s.div_(softcap).tanh_().mul_(softcap)
            return s if distance is None else s.addcmul_(slopes.view(1, -1, 1, 1), distance, value=-1.0)
        if softcap > 0:
            s = torch.tanh(s / softcap) * softcap
        return s if distance is None else s - slopes.view(1, -1, 1, 1) * distance

    hooked = softcap > 0 or slopes is not None
    return blocked_softmax_attention(
        q, k, v, scale=scale, causal=causal, mask=mask, bias=bias, score_mod=modify if hooked else None,
        hook_tensors=() if slopes is None else (slopes,), return_lse=return_lse,
    )


def flex_score_mod(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, alibi: bool | torch.Tensor, softcap: float, return_lse: bool = False,
) -> Output:
    if not torch.is_grad_enabled():
        # FlexAttention refuses closed-over tensors that require grad on CPU, even under no_grad (flex.attention
        # detaches q, k, v itself).
        bias = None if bias is None else bias.detach()
        alibi = alibi.detach() if isinstance(alibi, torch.Tensor) else alibi
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    slopes = _slopes(alibi, h, q)
    steps = []
    if softcap > 0:  # the cap rides in a tensor: the compiled kernel is reused for every cap value
        steps.append(mods.softcap(torch.tensor(softcap, dtype=q.dtype, device=q.device)))
    if slopes is not None:
        steps.append(mods.alibi(slopes, skv - sq))
    if bias is not None:
        steps.append(mods.additive(bias.expand(b, h, sq, skv)))
    if mask is not None:
        steps.append(mods.masked(mask.expand(b, h, sq, skv)))
    block_mask = flex.block_mask("causal", masks.causal(sq, skv), None, None, sq, skv, q.device) if causal else None
    return flex.attention(q, k, v, scale=scale, score_mod=mods.compose(*steps), block_mask=block_mask,
                          return_lse=return_lse)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, alibi: bool | torch.Tensor, softcap: float,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal attention with the score modifiers over a (right-padded) prompt and the cache of its keys and values."""
    out = torch_blockwise(q, k, v, causal=True, scale=scale, mask=None, bias=None, alibi=alibi, softcap=softcap)
    return out, KVCache.from_prompt(k, v, lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, alibi: bool | torch.Tensor,
    softcap: float,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: append, modify the logits of every slot by position, attend."""
    cache = cache.append(k, v)
    heads = q.shape[1]
    slopes = _slopes(alibi, heads, q)
    if softcap <= 0 and slopes is None:
        return softmax_attention(cache, q, scale), cache
    s = grouped_logits(q, cache.keys, scale)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        b = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=q.device).view(1, -1, 1, 1)
        q_idx = cache.query_positions(q.shape[2]).long()
        s = mods.alibi(slopes, 0)(s, b, h, q_idx, cache.key_positions(heads).long())
    counts = cache.slot_log_weights(heads)
    return softmax_attention(cache, q, scale, scores=s if counts is None else s + counts), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("torch", torch_blockwise, lse=True),
                           Backend("flex", flex_score_mod, flex.unavailable, lse=True)],
         DECODER)
