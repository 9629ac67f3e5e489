"""Memories learned at test time under a nonlinear retention gate (Miras' Moneta and Memora): the chunked fast path
(:func:`chunked`) and its recurrent state.

Per head, the linear memory ``W (Dk, Dv)`` (``M(k) = Wᵀk``) is read through a stored variable ``X`` of the same shape,
and the sequence is cut into chunks of ``C`` tokens from its first token. For token ``t`` of a chunk whose first token
sees the weights ``W₀``::

    g_t = θ_t k_t φ(W₀ᵀ k_t − v_t)ᵀ          the (scaled) gradient of the inner loss at the chunk-start weights
    X_t = post(a_t X_{t−1} − g_t),   a_t = 1 − α_t
    W_t = read(X_t),                  o_t = W_tᵀ q_t

with the retention (:data:`RETENTIONS`):

- ``"lq"`` (Moneta's ℓq retention, Miras eq. 24): ``X = A`` the accumulator, ``post`` the identity,
  ``read(A) = A / ‖A‖_q^{q−2}`` (the entrywise q-norm of the whole matrix; 0 stays 0). ``q = 2`` is plain decay;
- ``"kl"`` (Memora's KL retention, Miras eq. 27): ``X = log W``, ``post = log_softmax`` over ``Dk`` (each value
  coordinate's weights over the key coordinates are a probability vector), ``read = exp``; ``X₀`` uniform.

Fast path. The gradients of a chunk are all taken at ``W₀``, so they are one ``C × Dk`` by ``Dk × Dv`` product per
chunk (the expensive, parallel part). The retention is nonlinear in ``X`` (a q-norm of the whole matrix, a softmax),
so ``X`` cannot be unrolled into a linear chunk formula; a loop over the chunk's tokens runs the per-token state
update (a scale and a rank-one ``baddbmm``, plus the ``log_softmax`` for ``"kl"``), and each chunk's ``read`` and
outputs are batched over its tokens. O(N·D²) time with O(N) small kernels; the chunk holds its ``C`` states
``(C, Dk, Dv)`` per head at once. Differentiable by plain autograd (training keeps every token's state: O(N·D²)
memory). fp16/bf16 inputs are computed in fp32. Heads must already match (callers repeat K/V heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnzoo.errors import fail
from attnzoo.kernels.linear_scan import FeatureMaps, accumulation_dtype
from attnzoo.kernels.memory_scan import loss_gradient

RETENTIONS = ("lq", "kl")


@dataclass(frozen=True)
class RetentionState:
    """Where a memory stands between calls: the stored variable ``memory`` ``X`` ``(B, H, Dk, Dv)`` (``A`` or
    ``log W``), the weights ``chunk_start`` the current chunk's gradients are taken at, and the ``position`` in that
    chunk (0: the next token starts a chunk and takes ``read(X)``)."""

    memory: torch.Tensor
    chunk_start: torch.Tensor
    position: int

    @property
    def nbytes(self) -> int:
        """The bytes the state holds (two ``Dk × Dv`` matrices per head, whatever the length decoded)."""
        return sum(t.numel() * t.element_size() for t in (self.memory, self.chunk_start))


def empty_state(retention: str, batch: int, heads: int, dk: int, dv: int, dtype: torch.dtype,
                device: torch.device) -> RetentionState:
    """Before the first token: ``A = 0`` (``"lq"``), or the uniform ``W = 1/Dk`` (``"kl"``, whose log must exist)."""
    shape, acc = (batch, heads, dk, dv), accumulation_dtype(dtype)
    if retention == "lq":
        zero = torch.zeros(shape, dtype=acc, device=device)
        return RetentionState(zero, zero, 0)
    if retention != "kl":
        raise fail("retention", f"one of {list(RETENTIONS)}", repr(retention))
    return RetentionState(torch.full(shape, -math.log(dk), dtype=acc, device=device),
                          torch.full(shape, 1.0 / dk, dtype=acc, device=device), 0)


def abs_power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``|x|^exponent``; a small integer exponent by repeated products (on the CPU several times faster than
    ``pow``, which dominated Moneta's cost)."""
    if not float(exponent).is_integer() or not 1 <= exponent <= 8:
        return x.abs().pow(exponent)
    n = int(exponent)
    base = x.square() if n % 2 == 0 else x.abs()
    result = base
    for _ in range(n // 2 - 1 if n % 2 == 0 else n - 1):
        result = result * base
    return result


def shrink(memory: torch.Tensor, q_norm: float) -> torch.Tensor:
    """``‖A‖_q^{−(q−2)}`` over the last two dims (kept as size 1): the factor that makes ``W = A / ‖A‖_q^{q−2}``
    (1 while ``A = 0``, whose ``W`` is 0)."""
    power = abs_power(memory, q_norm).sum(dim=(-2, -1), keepdim=True)  # ‖A‖_q^q
    return torch.where(power > 0, power, torch.ones_like(power)).pow(-(q_norm - 2) / q_norm)


def read(memory: torch.Tensor, retention: str, q_norm: float) -> torch.Tensor:
    """The weights ``W`` of the stored ``X`` (``(…, Dk, Dv)``): ``A / ‖A‖_q^{q−2}`` or ``exp(log W)``."""
    if retention == "kl":
        return memory.exp()
    return memory if q_norm == 2 else memory * shrink(memory, q_norm)


def _outputs(q: torch.Tensor, memories: torch.Tensor, retention: str, q_norm: float) -> torch.Tensor:
    """``o_t = W_tᵀ q_t`` for a chunk's queries ``(BH, L, Dk)`` and states ``(BH, L, Dk, Dv)``; Moneta's as
    ``(A_tᵀ q_t) · ‖A_t‖_q^{2−q}`` (no ``W`` formed)."""
    if retention == "kl":
        return (q[:, :, None] @ memories.exp())[:, :, 0]
    out = (q[:, :, None] @ memories)[:, :, 0]
    return out if q_norm == 2 else out * shrink(memories, q_norm)[..., 0]


def chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, alpha: torch.Tensor, *, retention: str,
    chunk: int, loss: str = "l2", p: float = 2.0, q_norm: float = 2.0, state: RetentionState | None = None,
    features: FeatureMaps | None = None,
) -> tuple[torch.Tensor, RetentionState]:
    """``q, k (B, H, N, Dk)``, ``v (B, H, N, Dv)``, learning rate ``theta`` and forgetting ``alpha`` ``(B, H, N)``;
    ``loss`` and ``p`` the attentional bias (:func:`attnzoo.kernels.memory_scan.loss_gradient`), ``q_norm`` the
    exponent of ``"lq"``; continues ``state`` (None: :func:`empty_state`); ``features`` maps ``(φ_q, φ_k)`` applied to
    queries and keys. Returns ``(o (B, H, N, Dv), state)``."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    if state is None:
        state = empty_state(retention, b, h, dk, dv, q.dtype, q.device)
    acc = accumulation_dtype(q.dtype)
    if features is not None:
        q, k = features[0](q), features[1](k)
    qs, ks, vs = (x.to(acc).reshape(b * h, n, x.shape[-1]) for x in (q, k, v))
    rate = theta.to(acc).reshape(b * h, n, 1)
    keep = (1.0 - alpha.to(acc)).reshape(b * h, n, 1, 1)
    memory = state.memory.to(acc).reshape(b * h, dk, dv)
    start = state.chunk_start.to(acc).reshape(b * h, dk, dv)
    position, outs, t = state.position, [], 0
    while t < n:
        stop = min(t + chunk - position, n)
        if position == 0:
            start = read(memory, retention, q_norm)
        err = torch.baddbmm(vs[:, t:stop], ks[:, t:stop], start, beta=-1.0)  # K W₀ − V, the chunk at once
        rows = loss_gradient(err, loss, 1.0, p) * rate[:, t:stop]
        states = []
        for i in range(stop - t):
            memory = torch.baddbmm(memory * keep[:, t + i], ks[:, t + i, :, None], rows[:, i, None], alpha=-1.0)
            if retention == "kl":
                memory = torch.log_softmax(memory, dim=-2)
            states.append(memory)
        outs.append(_outputs(qs[:, t:stop], torch.stack(states, dim=1), retention, q_norm))
        position, t = (position + stop - t) % chunk, stop
    out = torch.cat(outs, dim=1).reshape(b, h, n, dv).to(v.dtype)
    return out, RetentionState(memory.reshape(b, h, dk, dv), start.reshape(b, h, dk, dv), position)
