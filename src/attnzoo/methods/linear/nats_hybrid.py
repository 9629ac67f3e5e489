"""L11 — NAtS-L: a token-level hybrid of softmax attention and the gated delta rule in one layer.

Paper: "Neural Attention Search Linear: Towards Adaptive Token-Level Hybrid Attention Models" (Deng, Winje, Fehring,
Lindauer, arXiv:2602.03681); read with the authors' public code (automl/NeuralAttentionSearchLinear, the GDN variant).

Each key/value token ``j`` is routed, per key head, either to a **softmax KV cache** (retrieval tokens, kept exactly,
``f_j = 1``) or into the **gated-delta state** (``f_j = 0``). A query reads both memories and the outputs add::

    o_i = Σ_{j ≤ i, f_j = 1} softmax_j(scale · q_i·k_j) v_j                     (0 when no retained key is visible)
        + S_iᵀ (scale · q̂_i),   S_t = α_t (I − β'_t k̂_t k̂_tᵀ) S_{t−1} + β'_t k̂_t v_tᵀ,   β'_t = β_t (1 − f_t)

i.e. a softmax-routed token writes nothing into the state (β' = 0), while the decay α_t still applies there (the
code's ``decay_for_non_gdn_blocks=True``). The state part is exactly :mod:`attnzoo.methods.linear.gated_delta` (same
``log_gate``, ``beta``, ``qk_l2norm``, ``chunk_size``; ``q̂, k̂`` L2-normalised by default).

Routing: ``flags``, a bool ``(B, Hkv, S)`` tensor (True = softmax KV), or, when it is None, a learnable linear scorer
on the keys, ``f_j = [σ(k_j·w_h + b_h) > ½]`` with ``scorer_weight (Hkv, D)`` and ``scorer_bias (Hkv,)`` (owned by
``az.nn.Attention``; init ``w ~ N(0, 1/D)``, ``b = 0``). The scorer is trained as the paper trains its router, with a
straight-through estimator ``f = hard + σ − sg(σ)``: its gradient reaches the scorer through ``β' = β(1 − f)`` and
through the softmax logits of the retained keys (``+ f − sg(f)``, value 0, i.e. ``log f`` at ``f = 1``); keys not
retained give the softmax part no router gradient (as the code's ``compute_dnats_for_invalid_blocks_attn=False``).

Choices (recorded, differing from the paper's layer): the paper routes 64-token blocks by a scorer on the mean-pooled
hidden states, handles the still-incomplete current block with the delta rule, and mixes the two outputs with learned
per-token weights after an RMS norm and output gate. Here routing is per token (a block-pooled router would look at
future tokens of the block), the scorer sees the keys (this function has no hidden states), and the outputs simply
add; norms, gates and mixing weights are layer-level. No gating of the softmax logits (the code's default
``use_g_for_attn=False``). Causal self-attention only.

Layer: ``attnzoo.nn.Attention(..., method="nats_hybrid")`` builds Gated DeltaNet's layer parts around this kernel
(:mod:`attnzoo.nn.layers.nats_hybrid`: short convolutions, data-dependent ``β`` and decay, gated RMSNorm output) and
owns the scorer; ``faithful=False`` gives the bare kernel.

Reference: dense ``(S × S)`` softmax over the retained keys plus the dense gated-delta reference with ``β'``.
Fast path ``torch`` (:func:`torch_hybrid`): the retained keys are compacted (:mod:`attnzoo.kernels.retained`,
query-blocked softmax over them, O(N·T·D) for T retained keys) and the state part is the chunked WY scan
(:mod:`attnzoo.kernels.delta_scan`, O(N·C·D + N·D²)). Decoding: :func:`prefill` and :func:`step` carry a
:class:`HybridState`: the fixed-size delta state plus the softmax cache of retained keys (it grows only with retained
tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kernels import retained
from attnzoo.kernels.linear_scan import accumulation_dtype
from attnzoo.methods.common import dense_scores, repeat_kv, safe_softmax, visible
from attnzoo.methods.linear import gated_delta
from attnzoo.registry import Backend, Call, Decoder, LayerInfo, MethodSpec, Param, TestHints, register


def _flags_check(value: Any, call: Call) -> str | None:
    shape = (call.batch, call.kv_heads, call.seq_q)
    if value.dtype != torch.bool or tuple(value.shape) != shape:
        return f"a bool tensor of shape {shape} (batch, kv_heads, seq)"
    return None


def _scorer_check(bias: bool) -> Any:
    def check(value: Any, call: Call) -> str | None:
        shape = (call.kv_heads,) if bias else (call.kv_heads, call.head_dim)
        return None if tuple(value.shape) == shape and value.is_floating_point() else f"a float tensor of shape {shape}"

    return check


def _scorer_init(info: LayerInfo) -> torch.Tensor:
    return torch.randn(info.kv_heads, info.head_dim) / info.head_dim**0.5


def _sample(call: Call, gen: torch.Generator) -> dict[str, Any]:
    flags = torch.rand(call.batch, call.kv_heads, call.seq_q, generator=gen) < 0.4
    return {**gated_delta.SPEC.tests.sample_params(call, gen), "flags": flags.to(call.device)}  # type: ignore[misc]


SPEC = MethodSpec(
    name="nats_hybrid",
    family="linear",
    mechanism="L11",
    paper="Neural Attention Search Linear: Towards Adaptive Token-Level Hybrid Attention Models",
    arxiv="2602.03681",
    summary="per token: softmax KV for routed retrieval tokens, gated-delta state for the rest; outputs add",
    exact=True,
    patterns=frozenset({"self/causal"}),
    params=(
        Param("flags", (torch.Tensor,), None, "(B, Hkv, S) bool: True = softmax KV; None: from the scorer",
              check=_flags_check),
        Param("scorer_weight", (torch.Tensor,), None, "(Hkv, D) router weights on the keys (learnable)",
              check=_scorer_check(False), init=_scorer_init),
        Param("scorer_bias", (torch.Tensor,), None, "(Hkv,) router biases (learnable)",
              check=_scorer_check(True), init=lambda i: torch.zeros(i.kv_heads)),
        gated_delta.SPEC.param("log_gate"),
        gated_delta.SPEC.param("beta"),
        gated_delta.SPEC.param("qk_l2norm"),
        gated_delta.SPEC.param("chunk_size"),
    ),
    complexity="O(N·T·D + N·(C+D)·D) time for T retained tokens, O(block·T + N·C) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample, atol=1e-4, rtol=1e-3),
)


def routing(k: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hard, f)``: the bool routing ``(B, Hkv, S)`` and its straight-through float (value = hard, scorer grads)."""
    flags = params.get("flags")
    if flags is not None:
        return flags, flags.to(accumulation_dtype(k.dtype))
    w, b = params.get("scorer_weight"), params.get("scorer_bias")
    if w is None:
        raise fail("flags", "a (B, Hkv, S) bool tensor, or scorer_weight (and scorer_bias) to compute it", "neither")
    acc = accumulation_dtype(k.dtype)
    score = torch.einsum("bhsd,hd->bhs", k.to(acc), w.to(acc))
    if b is not None:
        score = score + b.to(acc)[None, :, None]
    soft = torch.sigmoid(score)
    hard = score > 0
    return hard, hard.to(acc) + soft - soft.detach()


def _delta_params(q: torch.Tensor, f: torch.Tensor, p: dict[str, Any]) -> dict[str, Any]:
    """The gated-delta parameters with ``β' = β (1 − f)`` per query head."""
    beta = p["beta"]
    bt = beta if isinstance(beta, torch.Tensor) else torch.full(q.shape[:3], float(beta), device=q.device)
    beta_ = bt.to(f.dtype) * (1.0 - f.repeat_interleave(q.shape[1] // f.shape[1], dim=1))
    return {"log_gate": p["log_gate"], "beta": beta_.to(q.dtype), "qk_l2norm": p["qk_l2norm"],
            "chunk_size": p["chunk_size"]}


def _router_bias(f: torch.Tensor) -> torch.Tensor | None:
    """The straight-through logit term ``f − sg(f)`` of the retained keys (None without router gradients)."""
    return (f - f.detach()) if f.requires_grad else None


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    h = q.shape[1]
    hard, f = routing(k, params)
    scores = dense_scores(q, k, scale)
    ste = _router_bias(f)
    if ste is not None:
        scores = scores + repeat_kv(ste[..., None, :], h).to(scores.dtype)
    seen = visible(True, None, q, k) & repeat_kv(hard[:, :, None, :], h)
    soft_part = safe_softmax(scores, seen) @ repeat_kv(v, h).to(scores.dtype)
    linear_part = gated_delta.reference(q, k, v, causal=True, scale=scale, mask=None, bias=None,
                                        **_delta_params(q, f, params))
    return (soft_part + linear_part).to(v.dtype)


def torch_hybrid(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    return _forward(q, k, v, scale, params)[0]


@dataclass
class HybridState:
    """Decoding state: the gated-delta state ``(B, H, Dk, Dv)`` and the softmax cache of retained tokens.

    ``keys (B, Hkv, T, D)``, ``values (B, Hkv, T, Dv)``, ``positions (B, Hkv, T)`` (padding slots hold a position
    no query reaches), ``length``: tokens seen so far.
    """

    delta: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    length: int


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, p: dict[str, Any],
) -> tuple[torch.Tensor, HybridState]:
    hard, f = routing(k, p)
    ste = _router_bias(f)
    pos, gathered = retained.compact(hard, k, v, *(() if ste is None else (ste,)))
    keys, values = gathered[0], gathered[1]
    soft_part = retained.attend(q, keys, values, pos, scale, key_bias=gathered[2] if ste is not None else None)
    linear_part, state = gated_delta.decode_prefill(q, k, v, scale=scale, **_delta_params(q, f, p))
    n = q.shape[2]
    pos = torch.where(pos < n, pos, torch.full_like(pos, torch.iinfo(pos.dtype).max))
    return (soft_part + linear_part).to(v.dtype), HybridState(state, keys, values, pos, n)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **params: Any,
) -> tuple[torch.Tensor, HybridState]:
    """Causal forward over a prompt (validated parameters); returns ``(out, state)`` to continue with a step."""
    return _forward(q, k, v, scale, params)


def decode_step(
    state: HybridState | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **params: Any,
) -> tuple[torch.Tensor, HybridState]:
    """One token ``q (B, H, 1, D)`` (validated parameters, ``flags``/gates of that token); ``state=None`` starts."""
    hard, f = routing(k, params)
    b, hkv = k.shape[:2]
    if state is None:
        acc = accumulation_dtype(q.dtype)
        state = HybridState(
            torch.zeros(b, q.shape[1], q.shape[-1], v.shape[-1], dtype=acc, device=q.device),
            k.new_zeros(b, hkv, 0, k.shape[-1]), v.new_zeros(b, hkv, 0, v.shape[-1]),
            torch.zeros(b, hkv, 0, dtype=torch.long, device=q.device), 0,
        )
    keys, values, positions = state.keys, state.values, state.positions
    if bool(hard.any()):
        never = torch.full_like(hard, torch.iinfo(torch.long).max, dtype=torch.long)
        keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        positions = torch.cat([positions, torch.where(hard, state.length, never)], dim=2)
    soft_part = retained.attend(q, keys, values, positions, scale, offset=state.length)
    linear_part, delta = gated_delta.decode_step(state.delta, q, k, v, scale=scale, **_delta_params(q, f, params))
    return (soft_part + linear_part).to(v.dtype), HybridState(delta, keys, values, positions, state.length + 1)


DECODER = Decoder(decode_prefill, decode_step, token_params=("flags", "log_gate", "beta"))

register(SPEC, reference, [Backend("torch", torch_hybrid)], DECODER)
