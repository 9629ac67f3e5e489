"""H3 — mixture-of-head attention (MoH): each token is attended by the heads its router picks, and only by those.

Paper: "MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin, Zhu, Yuan, Yan; ICML 2025; arXiv:2410.11842),
read with the authors' public code (SkyworkAI/MoH, ``MoH-ViT/attention.py``).

Multi-head attention is a sum over heads, ``O_t = Σ_i H_i(t) W_o,i``; MoH makes it a weighted sum over the heads a
per-token router activates, ``O_t = Σ_i g_i(t) H_i(t) W_o,i``. The kernel here is the per-head part of that sum:

    out[b, i, t] = g[b, i, t] · Attn_i(q_t)      where g[b, i, t] ≠ 0,
    out[b, i, t] = 0                              where g[b, i, t] = 0 (the pair (t, i) is not computed),

``Attn_i(q_t) = softmax(scale · q_t·K_iᵀ + bias + M) V_i`` over head ``i``'s keys (query head ``i`` reads KV head
``i // (H / Hkv)``, bottom-right causal mask, user mask and bias). The support of ``head_weights`` *is* the routing
decision: the gradient with respect to a zero weight is 0 (the head was not run, so there is nothing to
differentiate), in the reference as in the fast path. ``head_weights=None`` means every head with weight 1, i.e.
softmax attention. The output projection ``W_o`` is the layer's (``az.nn.MoHAttention``).

The routing (:func:`route`, what the layer's routers feed), as the paper's Eq. 5–7 with the public code's scaling:

- heads ``0 … h_s − 1`` are *shared* (always on), heads ``h_s … H − 1`` are *routed*;
- routed: ``p = softmax(W_r x_t)`` over the ``H − h_s`` routed heads, keep the top ``k`` of ``p``, renormalise the
  kept ones to sum 1 and multiply by ``k`` (so each kept head weighs 1 on average, as in multi-head attention);
- shared: ``softmax(W_s x_t) · h_s`` (a single shared head has the constant weight 1 and no router);
- two-group balance: ``[α1, α2] = 2 · softmax(W_h x_t)`` scales the shared and the routed weights (only when both
  groups exist);
- load balance over the ``T`` tokens of a batch: ``L_b = (H − h_s) · Σ_i f_i P_i`` with ``f_i`` the fraction of
  tokens that selected routed head ``i`` and ``P_i`` the mean of ``p_i`` (the public code's
  ``mean(P ∘ f) · E²``; the paper's Eq. 7 without the factor ``E = H − h_s``, which makes a balanced router score
  ``k``). The paper adds ``β · L_b`` (β = 0.01) to the task loss.

The paper's code computes every head for every token and then multiplies by the gates, which saves nothing.

Fast path ``torch`` (:func:`torch_routed_rows`): per (batch, head), the query rows the router selected are gathered
and attended against that head's full K/V (PyTorch's fused SDPA, K/V read in place for GQA), then scattered back and
weighted; a head every token selected (a shared head) is one plain call, a head no token selected costs nothing.
Causal calls cut the selected rows into chunks of :data:`CAUSAL_CHUNK`; a chunk attends only the keys its last row
may see (with a boolean mask for the rows before it), so the causal half of the work is skipped too (measured
1.3× causal SDPA at half the heads, against ~1.9× noncausal: the per-chunk masks and the keys a chunk reads beyond
its earlier rows' limits cost the rest). Work: ``O(Σ_i n_i · Skv · d)`` for ``n_i`` rows selected for head ``i``,
against ``O(H · Sq · Skv · d)`` for every head.

Decoding (:data:`DECODER`): a KV cache; ``head_weights`` is per token (``(B, H, T)`` with the step's tokens). The
prefill runs :func:`torch_routed_rows` over the prompt; a step appends its keys and values and reads the cache for
every head in one fused call, then applies the weights (one token's rows cost ``H`` dot-product rows, below the cost
of a per-head loop; the forward passes are where skipping pays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnzoo import masks
from attnzoo.kernels.dense import sdpa_attention
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.methods.common import dense_scores, repeat_kv, softmax_rows, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register

# selected query rows per call on causal calls: a chunk attends the keys up to its last row, with a boolean mask.
# Shorter chunks waste fewer keys (at 256 rows and half the heads routed, ~12 % more row-keys than needed at N = 4096),
# longer ones make fewer, larger calls; 64–128 measured best at N = 4096 (1 thread), 512 worst
CAUSAL_CHUNK = 128


def _check_weights(value: torch.Tensor, call: Call) -> str | None:
    want = (call.batch, call.heads, call.seq_q)
    if tuple(value.shape) != want:
        return f"a tensor of shape {want} (batch, heads, seq_q): one weight per token and head, 0 = not computed"
    if not value.is_floating_point():
        return "a floating-point tensor"
    return None


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    """About half of the (token, head) pairs routed, head 0 shared (every token), the last head of three or more
    chosen by no token."""
    shape = (call.batch, call.heads, call.seq_q)
    weights = 0.5 + torch.rand(shape, generator=generator, dtype=torch.float64)
    chosen = torch.rand(shape, generator=generator, dtype=torch.float64) < 0.5
    chosen[:, 0] = True
    if call.heads >= 3:
        chosen[:, -1] = False
    return {"head_weights": torch.where(chosen, weights, 0.0).to(call.dtype)}


SPEC = MethodSpec(
    name="moh",
    family="heads",
    mechanism="H3",
    paper="MoH: Multi-Head Attention as Mixture-of-Head Attention",
    arxiv="2410.11842",
    summary="per-token weighted heads g·Attn_i(q_t); the (token, head) pairs the router left out (g = 0) are not "
    "computed",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(
        Param(
            "head_weights", (torch.Tensor,), None,
            "g (batch, heads, seq_q): each head's weight for each token, 0 where the router did not select the head "
            "(that pair is not computed); None: every head with weight 1 (softmax attention)",
            check=_check_weights,
        ),
    ),
    complexity="O(Σ_i n_i·Skv·d) time for n_i query rows routed to head i (every head: H·Sq); memory of the SDPA "
    "kernel plus the gathered rows",
    tests=TestHints(sample_params=_sample),
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, head_weights: torch.Tensor | None,
) -> torch.Tensor:
    """Every head for every token, then gated: the paper's computation (with the zero weights' pairs set to 0)."""
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    out = softmax_rows(s, visible(causal, mask, q, k), repeat_kv(v, q.shape[1]))
    assert isinstance(out, torch.Tensor)
    if head_weights is None:
        return out
    w = head_weights.to(q.dtype).unsqueeze(-1)
    return torch.where(w != 0, w * out, torch.zeros_like(out))


def _head_part(t: torch.Tensor | None, b: int, h: int, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Batch ``b``, head ``h`` of a 4-D mask or bias (size-1 axes broadcast), at query ``rows`` (None: all), as
    ``(1, 1, n | 1, Skv | 1)``."""
    if t is None:
        return None
    part = t[b if t.shape[0] > 1 else 0, h if t.shape[1] > 1 else 0]
    if rows is not None and part.shape[0] > 1:
        part = part[rows]
    return part[None, None]


def _causal_rows(
    q: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, offset: int,
    mask: torch.Tensor | None, bias: torch.Tensor | None,
) -> torch.Tensor:
    """Causal attention of the query rows ``q (1, 1, n, D)`` at positions ``rows`` (ascending) over ``k``/``v``
    ``(1, 1, Skv, ·)``: query at position ``p`` sees keys ``j <= p + offset``. Rows go by :data:`CAUSAL_CHUNK`; a
    chunk reads the keys up to its last row's limit."""
    parts = []
    last = (rows + offset).tolist()
    for start in range(0, rows.shape[0], CAUSAL_CHUNK):
        stop = min(start + CAUSAL_CHUNK, rows.shape[0])
        keys = min(max(last[stop - 1] + 1, 1), k.shape[2])
        seen = torch.arange(keys, device=q.device).view(1, -1) <= (rows[start:stop] + offset).view(-1, 1)
        part_mask, part_bias = masks.rows(mask, start, stop), masks.rows(bias, start, stop)
        if part_mask is not None:
            seen = seen & part_mask[..., :keys]
        if part_bias is not None:
            part_bias = part_bias[..., :keys]
        parts.append(sdpa_attention(q[:, :, start:stop], k[:, :, :keys], v[:, :, :keys], causal=False, scale=scale,
                                    mask=seen.view(1, 1, *seen.shape[-2:]), bias=part_bias))
    return torch.cat(parts, dim=2)


def torch_routed_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, head_weights: torch.Tensor | None,
) -> torch.Tensor:
    """Each head attends only the query rows routed to it (see the module docstring)."""
    if head_weights is None:
        return sdpa_attention(q, k, v, causal=causal, scale=scale, mask=mask, bias=bias)
    batch, heads, sq, _ = q.shape
    group, skv = heads // k.shape[1], k.shape[2]
    chosen = head_weights != 0
    counts = chosen.sum(dim=-1).tolist()
    outs, where = [], []
    for b in range(batch):
        for h in range(heads):
            n = counts[b][h]
            if n == 0:
                continue
            kh, vh = k[b:b + 1, h // group][:, None], v[b:b + 1, h // group][:, None]
            rows = None if n == sq else chosen[b, h].nonzero().squeeze(1)
            part_mask, part_bias = _head_part(mask, b, h, rows), _head_part(bias, b, h, rows)
            if rows is None:
                o = sdpa_attention(q[b:b + 1, h:h + 1], kh, vh, causal=causal, scale=scale, mask=part_mask,
                                   bias=part_bias)
                rows = torch.arange(sq, device=q.device)
            elif causal:
                o = _causal_rows(q[b, h, rows][None, None], rows, kh, vh, scale, skv - sq, part_mask, part_bias)
            else:
                o = sdpa_attention(q[b, h, rows][None, None], kh, vh, causal=False, scale=scale, mask=part_mask,
                                   bias=part_bias)
            outs.append(o[0, 0])
            where.append((b * heads + h) * sq + rows)
    flat = q.new_zeros(batch * heads * sq, v.shape[-1])
    if outs:
        flat = flat.index_copy(0, torch.cat(where), torch.cat(outs))
    return flat.view(batch, heads, sq, -1) * head_weights.to(q.dtype).unsqueeze(-1)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, head_weights: torch.Tensor | None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal MoH over a (right-padded) prompt (only routed rows computed) and the cache of its keys and values."""
    out = torch_routed_rows(q, k, v, causal=True, scale=scale, mask=None, bias=None, head_weights=head_weights)
    return out, KVCache.from_prompt(k, v, lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    head_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, KVCache]:
    """``T`` tokens per sequence: append, read the cache for every head, weight each head by its token's weight."""
    cache = cache.append(k, v)
    out = softmax_attention(cache, q, scale)
    if head_weights is None:
        return out, cache
    w = head_weights.to(q.dtype).unsqueeze(-1)
    return torch.where(w != 0, w * out, torch.zeros_like(out)), cache


DECODER = Decoder(decode_prefill, decode_step, token_params=("head_weights",), kv_cache=True, chunked=True)


@dataclass(frozen=True)
class Routing:
    """What :func:`route` decides for each token: ``weights (..., H)`` (shared heads first; 0 = head not run),
    ``selected (..., H − h_s)`` the routed heads kept, and the batch's load-balance loss ``balance_loss`` (scalar)."""

    weights: torch.Tensor
    selected: torch.Tensor
    balance_loss: torch.Tensor


def route(
    routed_logits: torch.Tensor, top_k: int, shared_heads: int = 0, shared_logits: torch.Tensor | None = None,
    group_logits: torch.Tensor | None = None,
) -> Routing:
    """MoH's two-stage routing of tokens to heads (see the module docstring for the formulas).

    - ``routed_logits (..., E)``: ``W_r x_t`` over the ``E`` routed heads; ``top_k`` of them are kept per token;
    - ``shared_heads``: ``h_s``; ``shared_logits (..., h_s)`` = ``W_s x_t`` when ``h_s > 1`` (else None);
    - ``group_logits (..., 2)`` = ``W_h x_t`` when ``h_s > 0`` (else None).

    The load-balance loss averages over every leading position (all tokens of the batch).
    """
    routed = routed_logits.shape[-1]
    dtype = torch.promote_types(routed_logits.dtype, torch.float32)  # routing in fp32 at least
    p = torch.softmax(routed_logits.to(dtype), dim=-1)
    kept = torch.topk(p, top_k, dim=-1).indices
    selected = torch.zeros_like(p, dtype=torch.bool).scatter(-1, kept, True)
    gates = p * selected
    gates = gates / gates.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps) * top_k
    f = selected.reshape(-1, routed).to(dtype).mean(dim=0)
    balance = routed * (p.reshape(-1, routed).mean(dim=0) * f).sum()
    if shared_heads == 0:
        weights = gates
    else:
        if shared_heads == 1:
            shared = torch.ones_like(gates[..., :1])
        else:
            assert shared_logits is not None
            shared = torch.softmax(shared_logits.to(dtype), dim=-1) * shared_heads
        assert group_logits is not None
        alpha = 2 * torch.softmax(group_logits.to(dtype), dim=-1)
        weights = torch.cat([alpha[..., :1] * shared, alpha[..., 1:] * gates], dim=-1)
    return Routing(weights.to(routed_logits.dtype), selected, balance)


register(SPEC, reference, [Backend("torch", torch_routed_rows)], DECODER)
