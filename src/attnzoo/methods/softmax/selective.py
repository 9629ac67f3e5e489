"""S3 — selective attention (Selective Self-Attention, SSA).

Paper: "Selective Attention: Enhancing Transformer through Principled Context Control" (Zhang, Chang, Li,
Roy-Chowdhury, Chen, Oymak; NeurIPS 2024; arXiv:2411.12892). Official code: github.com/umich-sota/selective_attention.

SSA scales each query by an inverse temperature that depends on the query's token and its position, and each value
by a token-dependent temperature, then runs softmax attention:

    τ_q(i) = τ_pos(i) + τ_tok(q_i),   τ_pos(i) = 1 + exp(−exp(β_h)) · log n_i,   τ_tok(q_i) = tanh(u_h · q_i)
    τ_v(j) = 1 + tanh(w_g · v_j)
    O_i = Σ_j softmax_j(τ_q(i) · scale · q_i·k_j + bias_ij + M_ij) · τ_v(j) v_j

- ``n_i`` is the size of query ``i``'s context window: ``i + 1 + seq_kv − seq_q`` keys under the (bottom-right)
  causal mask, ``seq_kv`` without it (a user mask does not change it). The ``log n`` growth counters attention
  dilution in long contexts (the paper's position-aware temperature).
- The position coefficient is parameterised as in the official code (``1 + exp(−exp(β))·log n``, β initialised at
  2.0 there), which keeps it in (0, 1); ``pos_beta = None`` turns the position term off.
- Weight sharing: the token-aware temperatures are read from the query and value embeddings themselves, i.e. they
  reuse the q/v projections and add only one vector per head (``u_h`` of size head_dim, ``w_g`` of size
  head_dim_v): far under the paper's 0.5% parameter budget. This is our reading of the paper's weight-sharing
  strategy (the exact parameterisation of f in τ_tok = tanh(f(x)) is our choice).
- Value temperature per key/value head ``g`` (so GQA needs no copies); we give it the token term only.
- Parameters (all learnable, owned by ``az.nn.Attention``): ``query_temp`` ``(heads, head_dim)`` = u, init 0;
  ``pos_beta`` ``(heads,)`` = β, init 2.0; ``value_temp`` ``(kv_heads, head_dim_v)`` = w, init 0. ``None`` turns a
  term off; with all three ``None`` (the defaults of a plain call) this is softmax attention.

Fast path ``sdpa`` (:func:`sdpa_rescaled`): the temperatures are per-row scalars, so
``τ_q(i)·(q_i·k_j) = (τ_q(i) q_i)·k_j`` exactly: we scale Q and V (O(N·d)) and call S1's SDPA path,
:func:`attnzoo.kernels.dense.sdpa_attention`. Gradients reach u, β and w through autograd. The reference instead puts
the temperature on each materialised logit.

Log-sum-exp (``return_lse=True``): the output is one softmax over each query's visible keys (the value temperature
only rescales the values), so the row log-sum-exp of the tempered logits ``τ_q(i)·scale·q_i·k_j + bias_ij`` is
returned; the fast path then calls :func:`attnzoo.kernels.dense.attention_lse` on the same rescaled Q and V.

Decoding (:data:`DECODER`): the same folding. A causal query at position ``p`` has ``n = p + 1`` (its own position
in its sequence, ragged batches included), so its temperature is known when it arrives; the cache stores the keys
and the *scaled* values ``τ_v(j) v_j``. :func:`decode_prefill` runs :func:`sdpa_rescaled` over the prompt;
:func:`decode_step` scales the token's query and value, appends, and attends with
:func:`attnzoo.kv.attend.softmax_attention` (SDPA over the cache).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo.kernels.dense import attention_lse, sdpa_attention
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.methods.checks import tensor_shape
from attnzoo.methods.common import Output, dense_scores, repeat_kv, softmax_rows, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register

POS_BETA_INIT = 2.0


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(call.dtype)

    return {
        "query_temp": 0.3 * rand(call.heads, call.head_dim),
        "pos_beta": rand(call.heads) - 0.5,
        "value_temp": 0.3 * rand(call.kv_heads, call.head_dim_v),
    }


SPEC = MethodSpec(
    name="selective",
    family="softmax",
    mechanism="S3",
    paper="Selective Attention: Enhancing Transformer through Principled Context Control",
    arxiv="2411.12892",
    summary="softmax with learnable query temperature τ(q, i) = 1 + exp(−exp β)·log n_i + tanh(u·q) and value "
    "temperature 1 + tanh(w·v)",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(
        Param(
            "query_temp", (torch.Tensor,), None, "u (heads, head_dim): token-aware query temperature tanh(u·q)",
            check=tensor_shape(lambda c: (c.heads, c.head_dim), "heads, head_dim"),
            init=lambda layer: torch.zeros(layer.heads, layer.head_dim),
        ),
        Param(
            "pos_beta", (torch.Tensor,), None, "β (heads,): position-aware query temperature 1 + exp(−exp β)·log n",
            check=tensor_shape(lambda c: (c.heads,), "heads"),
            init=lambda layer: torch.full((layer.heads,), POS_BETA_INIT),
        ),
        Param(
            "value_temp", (torch.Tensor,), None, "w (kv_heads, head_dim_v): value temperature 1 + tanh(w·v)",
            check=tensor_shape(lambda c: (c.kv_heads, c.head_dim_v), "kv_heads, head_dim_v"),
            init=lambda layer: torch.zeros(layer.kv_heads, layer.head_dim),
        ),
    ),
    complexity="O(N²d) time; memory of the SDPA kernel plus O(N·d) for the rescaled q/v",
    tests=TestHints(sample_params=_sample),
    lse=True,
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, query_temp: torch.Tensor | None, pos_beta: torch.Tensor | None,
    value_temp: torch.Tensor | None, return_lse: bool = False,
) -> Output:
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    tau = torch.ones(b, h, sq, dtype=q.dtype, device=q.device)
    if pos_beta is not None:
        window = [max(i + 1 + skv - sq, 1) if causal else skv for i in range(sq)]
        log_n = torch.tensor([math.log(n) for n in window], dtype=q.dtype, device=q.device)
        coefficient = torch.exp(-torch.exp(pos_beta.to(q.dtype)))
        tau = tau + coefficient.view(1, h, 1) * log_n.view(1, 1, sq)
    if query_temp is not None:
        tau = tau + torch.tanh(torch.einsum("bhsd,hd->bhs", q, query_temp.to(q.dtype)))
    s = dense_scores(q, k, scale) * tau.unsqueeze(-1)
    if bias is not None:
        s = s + bias
    if value_temp is not None:
        v = v * (1.0 + torch.tanh(torch.einsum("bgsd,gd->bgs", v, value_temp.to(v.dtype)))).unsqueeze(-1)
    return softmax_rows(s, visible(causal, mask, q, k), repeat_kv(v, h), return_lse)


def _row_scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``tanh(weight_h · x_{h,s})`` as a ``(B, H, S, 1)`` column."""
    return torch.tanh(torch.matmul(x, weight.to(x.dtype).unsqueeze(-1)))


def _scaled_queries(
    q: torch.Tensor, window: torch.Tensor, query_temp: torch.Tensor | None, pos_beta: torch.Tensor | None,
) -> torch.Tensor:
    """``τ_q · q`` for context sizes ``window`` (broadcastable to ``(B, 1, Sq, 1)``)."""
    tau: torch.Tensor | None = None
    if pos_beta is not None:
        coefficient = torch.exp(-torch.exp(pos_beta.to(q.dtype))).view(1, -1, 1, 1)
        tau = 1.0 + coefficient * torch.log(window.to(q.dtype))
    if query_temp is not None:
        token = _row_scale(q, query_temp)
        tau = 1.0 + token if tau is None else tau + token
    return q if tau is None else q * tau


def _scaled_values(v: torch.Tensor, value_temp: torch.Tensor | None) -> torch.Tensor:
    """``τ_v · v``."""
    return v if value_temp is None else v * (1.0 + _row_scale(v, value_temp))


def sdpa_rescaled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, query_temp: torch.Tensor | None, pos_beta: torch.Tensor | None,
    value_temp: torch.Tensor | None, return_lse: bool = False,
) -> Output:
    sq, skv = q.shape[2], k.shape[2]
    if causal:
        window = torch.arange(1 + skv - sq, 1 + skv, device=q.device).clamp_(min=1)
    else:
        window = torch.full((sq,), skv, device=q.device)
    q = _scaled_queries(q, window.view(1, 1, sq, 1), query_temp, pos_beta)
    attend = attention_lse if return_lse else sdpa_attention
    return attend(q, k, _scaled_values(v, value_temp), causal=causal, scale=scale, mask=mask, bias=bias)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, query_temp: torch.Tensor | None,
    pos_beta: torch.Tensor | None, value_temp: torch.Tensor | None, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal selective attention over a (right-padded) prompt and the cache of its keys and scaled values."""
    out = sdpa_rescaled(q, k, v, causal=True, scale=scale, mask=None, bias=None, query_temp=query_temp,
                        pos_beta=pos_beta, value_temp=value_temp)
    return out, KVCache.from_prompt(k, _scaled_values(v, value_temp), lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    query_temp: torch.Tensor | None, pos_beta: torch.Tensor | None, value_temp: torch.Tensor | None,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: its query scaled for context ``position + 1``, its scaled value appended."""
    cache = cache.append(k, _scaled_values(v, value_temp))
    q = _scaled_queries(q, cache.query_positions(q.shape[2]) + 1, query_temp, pos_beta)
    return softmax_attention(cache, q, scale), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)


register(SPEC, reference, [Backend("sdpa", sdpa_rescaled, lse=True)], DECODER)
