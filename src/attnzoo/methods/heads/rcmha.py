"""H5 — RCMHA's relative attention scores (Transformer-XL's decomposition); its depthwise convolutions are the layer's.

Paper: "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling" (Sugiharto, Aradea,
Mubarok; arXiv:2308.03429). RCMHA changes multi-head attention in two places: a depthwise convolution on the
projected queries, keys and values (as Primer's Multi-DConv-Head Attention; :mod:`attnzoo.nn.layers.rcmha` builds it
around this kernel), and relative positional encoding in the attention scores "as in Transformer-XL / relative MHA".
This method is the second part, Transformer-XL's score ("Transformer-XL: Attentive Language Models Beyond a
Fixed-Length Context", Dai et al., arXiv:1901.02860, eq. of its section 3.3):

    s_ij = scale · [ (q_i + u_h)·k_j  +  (q_i + w_h)·r_h(p_i − j) ] + bias_ij + M_ij,      O = softmax(s) V
    r_h(δ) = W_h · φ(δ),   φ(δ) = [sin(δ·ω_1), …, sin(δ·ω_{P/2}), cos(δ·ω_1), …, cos(δ·ω_{P/2})]
    ω_m = 10000^(−2(m−1)/P)

``p_i = i + seq_kv − seq_q`` is query ``i``'s position (self-attention: ``p_i = i``), so ``p_i − j`` is how far key
``j`` lies behind it. Parameters (learnable, owned by ``az.nn.Attention``): ``content_bias`` u ``(heads, head_dim)``
and ``position_bias`` w ``(heads, head_dim)``, both initialised at 0 (None: 0); ``position_proj`` W ``(heads,
head_dim, P)`` projecting the sinusoid of width ``P`` (even; the layer's model width, as Transformer-XL's ``W_{k,R}``),
initialised like ``nn.Linear`` (None: no positional term, which leaves softmax attention with a content bias).

Choices: the paper's text gives no formula beyond "relative positional encoding as in Transformer-XL", so we take
Transformer-XL's. Self-attention only (relative positions need one axis for queries and keys), as URPE (S9).

Fast path ``sdpa`` (:func:`sdpa_relative`): ``u`` folds into the queries exactly (``(q + u)·k``); the positional
term is one ``(q + w) · r(δ)ᵀ`` product over the ``2·seq_kv − 1`` distances that occur, gathered to ``(i, j)`` as
Transformer-XL's "relative shift", and passed to :func:`attnzoo.kernels.dense.sdpa_attention` as an additive bias
(``O(N²)`` memory, like the paper's layer). The reference builds every ``r_h(p_i − j)`` and takes the dot products.

Decoding (:data:`DECODER`): the cache holds the keys and values; a step adds ``(q + w)·r(p − p_j)`` over the cached
slots' positions (a pressed cache keeps each slot's position).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo.kernels.dense import attention_lse, sdpa_attention
from attnzoo.kv.cache import KVCache
from attnzoo.methods.common import Output, dense_scores, repeat_kv, safe_softmax, softmax_rows, visible
from attnzoo.registry import SELF_PATTERNS, Backend, Call, Decoder, LayerInfo, MethodSpec, Param, TestHints, register

BASE = 10000.0


def _check_bias(value: torch.Tensor, call: Call) -> str | None:
    if tuple(value.shape) != (call.heads, call.head_dim) or not value.is_floating_point():
        return f"a floating-point tensor of shape (heads={call.heads}, head_dim={call.head_dim})"
    return None


def _check_proj(value: torch.Tensor, call: Call) -> str | None:
    if (value.dim() != 3 or tuple(value.shape[:2]) != (call.heads, call.head_dim) or value.shape[2] % 2
            or not value.is_floating_point()):
        return f"a floating-point tensor of shape (heads={call.heads}, head_dim={call.head_dim}, P) with P even"
    return None


def _init_proj(layer: LayerInfo) -> torch.Tensor:
    width = layer.dim + layer.dim % 2 if layer.dim else layer.head_dim + layer.head_dim % 2
    bound = 1 / math.sqrt(width)
    return torch.empty(layer.heads, layer.head_dim, width).uniform_(-bound, bound)


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(call.dtype)

    h, d = call.heads, call.head_dim
    return {"content_bias": 0.3 * rand(h, d), "position_bias": 0.3 * rand(h, d),
            "position_proj": rand(h, d, 6) / math.sqrt(6)}


SPEC = MethodSpec(
    name="rcmha",
    family="heads",
    mechanism="H5",
    paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
    arxiv="2308.03429",
    summary="relative attention scores (q+u)·k + (q+w)·W·φ(i−j) with sinusoids φ, as Transformer-XL; the paper "
    "layer adds depthwise convolutions on q/k/v",
    exact=True,
    patterns=SELF_PATTERNS,
    params=(
        Param("content_bias", (torch.Tensor,), None, "u (heads, head_dim): the global content bias",
              check=_check_bias, init=lambda layer: torch.zeros(layer.heads, layer.head_dim)),
        Param("position_bias", (torch.Tensor,), None, "w (heads, head_dim): the global position bias",
              check=_check_bias, init=lambda layer: torch.zeros(layer.heads, layer.head_dim)),
        Param("position_proj", (torch.Tensor,), None,
              "W (heads, head_dim, P): projection of the P-wide sinusoid of the distance i − j; None: no positions",
              check=_check_proj, init=_init_proj),
    ),
    complexity="O(N²d) time, O(N²) memory for the positional bias",
    tests=TestHints(sample_params=_sample),
    lse=True,
)


def sinusoid(distance: torch.Tensor, width: int) -> torch.Tensor:
    """Transformer-XL's encoding ``φ(δ)`` of each distance: ``distance.shape + (width,)``, sines then cosines."""
    freq = BASE ** (-torch.arange(0, width, 2, dtype=torch.float64, device=distance.device) / width)
    angle = distance.to(torch.float64).unsqueeze(-1) * freq
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def position_keys(distance: torch.Tensor, position_proj: torch.Tensor) -> torch.Tensor:
    """``r_h(δ) = W_h φ(δ)`` for each distance: ``(heads,) + distance.shape + (head_dim,)``."""
    phi = sinusoid(distance, position_proj.shape[-1]).to(position_proj.dtype)
    return torch.einsum("hdp,...p->h...d", position_proj, phi)


def _biased(q: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return q if bias is None else q + bias.to(q.dtype).view(1, -1, 1, q.shape[-1])


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, content_bias: torch.Tensor | None, position_bias: torch.Tensor | None,
    position_proj: torch.Tensor | None, return_lse: bool = False,
) -> Output:
    sq, skv = q.shape[2], k.shape[2]
    s = dense_scores(_biased(q, content_bias), k, scale)
    if position_proj is not None:
        pos = torch.arange(sq, device=q.device).view(-1, 1) + skv - sq
        r = position_keys(pos - torch.arange(skv, device=q.device).view(1, -1), position_proj.to(q.dtype))
        s = s + scale * torch.einsum("bhid,hijd->bhij", _biased(q, position_bias), r)
    if bias is not None:
        s = s + bias
    return softmax_rows(s, visible(causal, mask, q, k), repeat_kv(v, q.shape[1]), return_lse)


def relative_bias(q: torch.Tensor, skv: int, scale: float, position_bias: torch.Tensor | None,
                  position_proj: torch.Tensor) -> torch.Tensor:
    """``scale · (q_i + w)·r(p_i − j)`` as a ``(B, H, Sq, Skv)`` bias: one product with the ``2·Skv − 1`` distances
    ``Skv − 1 … −(Skv − 1)``, then the "relative shift" (a gather of each row's ``Skv`` distances)."""
    sq = q.shape[2]
    offsets = torch.arange(skv - 1, -skv, -1, device=q.device)  # column c holds distance skv − 1 − c
    r = position_keys(offsets, position_proj.to(q.dtype))  # (H, 2·skv − 1, d)
    table = _biased(q, position_bias) @ r.transpose(-1, -2).unsqueeze(0)  # (B, H, sq, 2·skv − 1)
    pos = torch.arange(sq, device=q.device).view(-1, 1) + skv - sq
    column = skv - 1 - (pos - torch.arange(skv, device=q.device).view(1, -1))
    return scale * table.gather(-1, column.expand(*table.shape[:2], sq, skv))


def sdpa_relative(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, content_bias: torch.Tensor | None, position_bias: torch.Tensor | None,
    position_proj: torch.Tensor | None, return_lse: bool = False,
) -> Output:
    if position_proj is not None:
        rel = relative_bias(q, k.shape[2], scale, position_bias, position_proj)
        bias = rel if bias is None else rel + bias
    attend = attention_lse if return_lse else sdpa_attention
    return attend(_biased(q, content_bias), k, v, causal=causal, scale=scale, mask=mask, bias=bias)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, content_bias: torch.Tensor | None,
    position_bias: torch.Tensor | None, position_proj: torch.Tensor | None, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal relative attention over a (right-padded) prompt and the cache of its keys and values."""
    out = sdpa_relative(q, k, v, causal=True, scale=scale, mask=None, bias=None, content_bias=content_bias,
                        position_bias=position_bias, position_proj=position_proj)
    return out, KVCache.from_prompt(k, v, lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    content_bias: torch.Tensor | None, position_bias: torch.Tensor | None, position_proj: torch.Tensor | None,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: append, score the slots it sees with the content and positional terms, combine."""
    cache = cache.append(k, v)
    heads = q.shape[1]
    q_pos = cache.query_positions(q.shape[2])
    s = cache.scores(_biased(q, content_bias), scale)
    if position_proj is not None:
        w = position_proj.to(q.dtype)
        phi = sinusoid(q_pos - cache.key_positions(heads), w.shape[-1]).to(q.dtype)  # (B, H, T, slots, P)
        qw = torch.einsum("bhtd,hdp->bhtp", _biased(q, position_bias), w)  # (q + w)·W_h, then · φ(p − p_j)
        s = s + scale * torch.einsum("bhtp,bhtsp->bhts", qw, phi)
    return cache.combine(safe_softmax(s, cache.visible_to(q_pos, heads))), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("sdpa", sdpa_relative, lse=True)], DECODER)
