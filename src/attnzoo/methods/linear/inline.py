"""L4 — InLine: injective linear attention (subtractive normalisation).

Paper: "Bridging the Divide: Reconsidering Softmax and Linear Attention" (Han et al., NeurIPS 2024,
arXiv:2412.06590); the formula follows its eq. (5) and the authors' public code (LeapLabTHU/InLine).

Formula as implemented, with ``s_ij = scale · q_i·k_j`` (identity kernel, as in the authors' code) and ``n_i`` the
number of keys query ``i`` sees (``Skv`` noncausally, ``i + 1`` causally)::

    w_ij = (s_ij − (1/n_i) Σ_{j'} s_ij' + 1) / n_i          (sums to 1 over the visible keys, may be negative)
    o_i  = Σ_j w_ij v_j = (Σ_j s_ij v_j − (Σ_j s_ij) v̄_i) / n_i + v̄_i,     v̄_i = (1/n_i) Σ_j v_j

The subtraction (instead of a division) makes the map from a query to its weights injective, which the paper shows
plain normalised linear attention is not. Choices: the causal form (the paper is noncausal, for vision) applies the
same definition to the visible prefix, so ``n_i = i + 1``. The paper's local-modelling residual (a 3×3 depthwise
convolution of V with weights predicted from the input) needs the image grid and the layer input, so it belongs to
the layer, not to this function.

Fast path ``torch`` (:func:`torch_chunked`): :mod:`attnzoo.kernels.linear_scan` on ``v`` with a column of ones appended
(unnormalised), which yields ``Σ_j s_ij v_j`` and ``Σ_j s_ij`` together; ``v̄_i`` is a running mean. O(N·D·Dv) time,
O(N) memory. Recurrent form: :func:`prefill` and :func:`step` (see :mod:`attnzoo.methods.linear.common`); the state is
``(B, Hkv, D + 1, Dv + 1)``: ``Σ k_j [v_j, 1]ᵀ`` with a last row ``Σ [v_j, 1]`` (the running value sum and count).
"""

from __future__ import annotations

import torch

from attnzoo.kernels import linear_scan
from attnzoo.methods.common import dense_scores, repeat_kv, visible
from attnzoo.registry import Backend, Decoder, MethodSpec, Param, register

SPEC = MethodSpec(
    name="inline",
    family="linear",
    mechanism="L4",
    paper="Bridging the Divide: Reconsidering Softmax and Linear Attention",
    arxiv="2412.06590",
    summary="injective linear attention: w_ij = (s_ij − mean_j' s_ij' + 1)/n, computed as a linear scan",
    exact=True,
    patterns=frozenset({"self/causal", "self/noncausal", "cross/noncausal"}),
    params=(Param("chunk_size", (int,), 128, "tokens per chunk of the causal chunked scan", low=1),),
    complexity="O(N·D·Dv) time, O(N) memory; decoding O(D·Dv) per token",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, chunk_size: int,
) -> torch.Tensor:
    seen = visible(causal, None, q, k).to(q.dtype)
    n = seen.sum(dim=-1, keepdim=True)
    s = dense_scores(q, k, scale) * seen
    w = (s - s.sum(dim=-1, keepdim=True) / n + 1.0) / n * seen
    return w @ repeat_kv(v, q.shape[1])


def _combine(o_aug: torch.Tensor, v_mean: torch.Tensor, count: torch.Tensor, heads: int) -> torch.Tensor:
    """``(num − den·v̄)/n + v̄`` from scan outputs ``o_aug (B, H, S, Dv+1)`` (``[num, den]``), the per-kv-head running
    means ``v̄ (B, Hkv, S or 1, Dv)`` and counts ``n`` (broadcastable to ``(B, Hkv, S, 1)``)."""
    b, _, s, dve = o_aug.shape
    o = o_aug.view(b, v_mean.shape[1], heads // v_mean.shape[1], s, dve)
    num, den = o[..., :-1], o[..., -1:]
    v_mean, count = v_mean[:, :, None], count[:, :, None]
    return ((num - den * v_mean) / count + v_mean).reshape(b, heads, s, dve - 1)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _scan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    acc = linear_scan.accumulation_dtype(q.dtype)
    h = q.shape[1]
    v_aug = _with_ones(v.to(acc))
    if causal:
        o_aug, state = linear_scan.causal(q * scale, k, v_aug, chunk=chunk, return_state=True)
        totals = v_aug.cumsum(dim=2)  # running Σ [v, 1]
        count = totals[..., -1:]
        return _combine(o_aug, totals[..., :-1] / count, count, h).to(v.dtype), state
    o_aug = linear_scan.noncausal(q * scale, k, v_aug)
    count = torch.full((1, 1, 1, 1), float(k.shape[2]), dtype=acc, device=q.device)
    return _combine(o_aug, v_aug[..., :-1].mean(dim=2, keepdim=True), count, h).to(v.dtype), None


def torch_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, chunk_size: int,
) -> torch.Tensor:
    return _scan(q, k, v, scale, causal, chunk_size)[0]


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal forward over a prompt (validated parameters); returns ``(out, state)`` to continue with a step."""
    out, kv = _scan(q, k, v, scale, True, chunk_size)
    assert kv is not None
    totals = _with_ones(v.to(kv.dtype)).sum(dim=2, keepdim=True)  # (B, Hkv, 1, Dv+1)
    return out, torch.cat([kv, totals], dim=2)


def decode_step(
    state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token ``q (B, H, 1, D)`` (validated parameters); ``state=None`` starts a new sequence."""
    acc = linear_scan.accumulation_dtype(q.dtype)
    q_aug = torch.cat([q.to(acc) * scale, q.new_zeros(*q.shape[:-1], 1, dtype=acc)], dim=-1)
    k_aug = _with_ones(k.to(acc))
    v_aug = _with_ones(v.to(acc))
    if state is None:
        state = linear_scan.empty_state(q_aug, k_aug, v_aug, decay=None, normalize=False)
    o_aug, state = linear_scan.step(state, q_aug, k_aug, v_aug)
    totals = state[:, :, -1:, :]  # (B, Hkv, 1, Dv+1): running Σ [v, 1]
    count = totals[..., -1:]
    out = _combine(o_aug, totals[..., :-1] / count, count, q.shape[1])
    return out.to(v.dtype), state


DECODER = Decoder(decode_prefill, decode_step)

register(SPEC, reference, [Backend("torch", torch_chunked)], DECODER)
