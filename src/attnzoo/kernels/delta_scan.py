"""The gated delta rule: chunked form (WY/UT transform, batched over chunks) and one recurrent step.

Recurrence (state ``S (Dk, Dv)`` per head, the transpose of the papers' ``(Dv, Dk)`` writing)::

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,      o_t = S_tᵀ q_t,      α_t = exp(g_t)

Chunked form. Inside a chunk (positions t = 1..C, ``γ_t = exp(Σ_{s≤t} g_s)`` cumulated from the chunk start, state
``S_0`` before it), the extended WY representation gives ``S_t = γ_t S_0 + Σ_{i≤t} (γ_t/γ_i) k_i u_iᵀ`` with pseudo
values ``(I + A) U = diag(β)(V − diag(γ) K S_0)``, ``A = tril(diag(β)(K Kᵀ ⊙ Γ), −1)``, ``Γ_ti = γ_t/γ_i``. So
``U = U_v − W_k S_0`` where ``U_v = (I + A)⁻¹ diag(β) V`` and ``W_k = (I + A)⁻¹ diag(βγ) K`` do not depend on the
state: one batched unit-lower-triangular solve over all chunks at once (the UT transform). Then, per chunk,

    O   = P U_v + (diag(γ) Q − P W_k) S_0,                      P = tril(Q Kᵀ ⊙ Γ)
    S_C = (γ_C I − K̃ᵀ W_k) S_0 + K̃ᵀ U_v,                       K̃ = diag(γ_C/γ) K

All of ``P``, ``U_v``, ``W_k``, the effective queries, the ``Dk×Dk`` transitions and the ``Dk×Dv`` inputs are batched
matmuls over every chunk; only ``S ← M_c S + B_c`` (a ``Dk×Dk`` by ``Dk×Dv`` product) runs as a loop over chunks,
and the outputs are one more batched matmul against the stacked chunk-start states. Every decay factor is ``≤ 1``
(differences of the within-chunk cumulative log gates), so nothing overflows. The sequence is padded at the front
with zero keys/values and zero log gates, which leave the state untouched, so the final state is exact. fp16/bf16
inputs are computed in fp32. Plain autograd. Heads must already match (callers repeat K/V heads for GQA, since each
query head has its own gates and therefore its own state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kernels.linear_scan import accumulation_dtype


def chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor, beta: torch.Tensor, *, chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q, k (B, H, N, Dk)``, ``v (B, H, N, Dv)``, ``log_gate, beta (B, H, N)``; returns ``(o, S_N)``."""
    out_dtype = v.dtype
    acc = accumulation_dtype(q.dtype)
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    c = max(1, min(chunk, n))
    pad = (-n) % c
    q, k, v = (F.pad(t.to(acc), (0, 0, pad, 0)) for t in (q, k, v))
    g, bt = (F.pad(t.to(acc), (pad, 0)) for t in (log_gate, beta))
    nc = (n + pad) // c
    q, k, v = q.view(b, h, nc, c, dk), k.view(b, h, nc, c, dk), v.view(b, h, nc, c, dv)
    g, bt = g.view(b, h, nc, c), bt.view(b, h, nc, c)

    cum = g.cumsum(dim=-1)  # within-chunk log γ_t
    t = torch.arange(c, device=q.device)
    incl = t[:, None] >= t[None, :]
    strict = t[:, None] > t[None, :]
    diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~incl, float("-inf"))
    gam = torch.exp(diff)  # Γ_ti = γ_t/γ_i on and below the diagonal, 0 above
    kk = k @ k.transpose(-1, -2)
    a = (kk * gam * bt[..., :, None]).masked_fill(~strict, 0.0)
    eye = torch.eye(c, dtype=acc, device=q.device)
    rhs = torch.cat([bt[..., None] * v, (bt * torch.exp(cum))[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(a + eye, rhs, upper=False, unitriangular=True)
    u_v, w_k = solved[..., :dv], solved[..., dv:]
    p = (q @ k.transpose(-1, -2)) * gam
    q_eff = torch.exp(cum)[..., None] * q - p @ w_k  # (B, H, n, C, Dk)
    o_intra = p @ u_v
    k_tail = torch.exp(cum[..., -1:] - cum)[..., None] * k  # K̃
    trans = torch.exp(cum[..., -1])[..., None, None] * torch.eye(dk, dtype=acc, device=q.device)
    trans = trans - k_tail.transpose(-1, -2) @ w_k  # (B, H, n, Dk, Dk)
    inputs = k_tail.transpose(-1, -2) @ u_v  # (B, H, n, Dk, Dv)

    s = torch.zeros(b, h, dk, dv, dtype=acc, device=q.device)
    starts = []
    # chunk-major contiguous copies, so each step's operands are contiguous; unbind (not indexing): a linear backward
    trans_c = trans.movedim(2, 0).reshape(nc, b * h, dk, dk)
    inputs_c = inputs.movedim(2, 0).reshape(nc, b * h, dk, dv)
    for m_i, b_i in zip(trans_c.unbind(dim=0), inputs_c.unbind(dim=0), strict=True):
        starts.append(s)
        s = torch.baddbmm(b_i, m_i, s.reshape(-1, dk, dv)).view(b, h, dk, dv)
    o = o_intra + q_eff @ torch.stack(starts, dim=2)
    return o.reshape(b, h, nc * c, dv)[:, :, pad:].to(out_dtype), s


def step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor, beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``q, k (B, H, 1, Dk)``, ``v (B, H, 1, Dv)``, ``log_gate, beta (B, H, 1)``; returns ``(o, S)``."""
    if q.shape[2] != 1:
        raise fail("q", "one token per step (seq 1)", f"seq {q.shape[2]}")
    b, h = q.shape[:2]
    expected = (b, h, q.shape[-1], v.shape[-1])
    if tuple(state.shape) != expected:
        raise fail("state", f"shape {expected}", tuple(state.shape))
    acc, out_dtype = state.dtype, v.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    alpha = torch.exp(log_gate.to(acc))[..., None]  # (B, H, 1, 1)
    decayed = alpha * state
    error = v - k @ decayed  # (B, H, 1, Dv): v_t − α_t S_{t−1}ᵀ k_t
    dk, dv = state.shape[-2:]
    update = (beta.to(acc)[..., None] * error).reshape(-1, 1, dv)
    state = torch.baddbmm(decayed.reshape(-1, dk, dv), k.reshape(-1, dk, 1), update).view(b, h, dk, dv)
    return (q @ state).to(out_dtype), state
