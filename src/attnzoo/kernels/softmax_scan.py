"""Cumulative softmax by a parallel prefix scan: softmax attention over every prefix of a sequence in O(N) memory.

For per-position scores ``s_j`` and values ``v_j`` (``j = 1..N``), the output at every position ``t`` is the softmax
attention over the prefix ``1..t``::

    o_t = Σ_{j≤t} exp(s_j) v_j / Σ_{j≤t} exp(s_j)

It is carried by the triple of "Attention as an RNN" (Feng et al., arXiv:2405.13956, §3.2), a :class:`ScanState`::

    m = max_{j} s_j,    u = Σ_j exp(s_j − m),    w = Σ_j exp(s_j − m) v_j,    o = w / u

over any contiguous run of positions. Two runs ``a`` (earlier) and ``b`` (later) combine by the associative operator
of the paper (:func:`combine`)::

    m = max(m_a, m_b),   u = u_a e^{m_a − m} + u_b e^{m_b − m},   w = w_a e^{m_a − m} + w_b e^{m_b − m}

so the prefixes of every position are a prefix scan (the paper's many-to-many RNN), and a recurrent step is one
combine with a constant-size state (its many-to-one RNN). No factor ``e^{· − m}`` exceeds 1, so nothing overflows.

The scan (:func:`prefix_scan`) is chunked and recursive, chosen over a log-depth Hillis–Steele scan by measurement
(docs/s-layers.md). Positions are cut into chunks of ``CHUNK``; inside a chunk the inclusive prefixes come at once
from a lower-triangular ``C×C`` weight matrix ``A_tj = e^{m_j − r_t}`` (``r_t`` the running max,
:func:`torch.cummax`), as ``u = A·u_elem`` and ``w = A @ w_elem`` (one batched matmul); the chunks' totals are
themselves scanned by the same function (recursion, ``N / C`` elements, then ``N / C²``...), and each chunk's
exclusive carry is combined into its positions. Time O(N·C·Dv), memory O(N·(C + Dv)): linear in N. Padding uses the
neutral element ``(−inf, 0, 0)``.

Masked positions (score ``−inf``) weigh 0; a prefix that sees nothing has ``m = −inf``, ``u = 0``, ``w = 0``, and
:func:`finish` gives it output 0 and log-sum-exp ``−inf`` (finite gradients).

Gradients: the running maxima are only stabilisers — ``o`` and ``log u + m`` do not depend on them — so every state's
``m`` is detached; gradients flow through the element scores inside the exponentials and through ``u``, ``w``. This is
exact, and saves differentiating ``cummax``.

Broadcasting: leading dims of ``s (..., N)`` and ``v (..., N, Dv)`` broadcast (GQA: query heads as an extra dim of
``s``, their key head's values with size 1 there), so values are never repeated per query head by the caller.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

CHUNK = 64  # positions per chunk of the scan (measured fastest of 16/32/64/128 on CPU: docs/s-layers.md)


class ScanState(NamedTuple):
    """The paper's ``(m, u, w)`` of runs of positions: ``m``, ``u`` ``(...)``, ``w`` ``(..., Dv)`` (one run), or
    with a positions dim before ``Dv`` (every prefix)."""

    m: torch.Tensor
    u: torch.Tensor
    w: torch.Tensor


def _stabiliser(m: torch.Tensor) -> torch.Tensor:
    """``m`` with ``−inf`` (nothing seen) replaced by 0, detached: the reference point of the exponentials."""
    m = m.detach()
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def combine(a: ScanState, b: ScanState) -> ScanState:
    """The paper's associative operator: the state of run ``a`` followed by run ``b`` (shapes broadcast)."""
    m = torch.maximum(a.m, b.m).detach()
    ref = _stabiliser(m)
    ea, eb = torch.exp(a.m - ref), torch.exp(b.m - ref)
    return ScanState(m, a.u * ea + b.u * eb, a.w * ea.unsqueeze(-1) + b.w * eb.unsqueeze(-1))


def _within(m: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> ScanState:
    """Inclusive prefixes along the last positions dim (``C`` elements ``m, u (..., C)``, ``w (..., C, Dv)``), at
    once: ``A_tj = e^{m_j − r_t}`` for ``j ≤ t`` with ``r_t`` the running max; ``u_t = Σ_j A_tj u_j``,
    ``w_t = Σ_j A_tj w_j``."""
    c = m.shape[-1]
    running = torch.cummax(m.detach(), dim=-1).values
    later = torch.ones(c, c, dtype=torch.bool, device=m.device).triu_(1)
    exponent = (m.unsqueeze(-2) - _stabiliser(running).unsqueeze(-1)).masked_fill(later, float("-inf"))
    weights = torch.exp(exponent)
    return ScanState(running, (weights @ u.unsqueeze(-1)).squeeze(-1), weights @ w)


def _neutral_pad(state: ScanState, pad: int) -> ScanState:
    """``state`` with ``pad`` neutral elements ``(−inf, 0, 0)`` appended along the positions dim."""
    return ScanState(F.pad(state.m, (0, pad), value=float("-inf")), F.pad(state.u, (0, pad)),
                     F.pad(state.w, (0, 0, 0, pad)))


def _scan(elements: ScanState, chunk: int) -> ScanState:
    """Inclusive prefix states of ``elements`` along the positions dim (recursive chunked scan)."""
    n = elements.m.shape[-1]
    if n <= chunk:
        return _within(*elements)
    pad = -n % chunk
    padded = _neutral_pad(elements, pad)
    chunks = (n + pad) // chunk
    m, u = (t.unflatten(-1, (chunks, chunk)) for t in padded[:2])
    w = padded.w.unflatten(-2, (chunks, chunk))
    local = _within(m, u, w)
    totals = _scan(last(local), chunk)
    carry = ScanState(F.pad(totals.m[..., :-1], (1, 0), value=float("-inf")), F.pad(totals.u[..., :-1], (1, 0)),
                      F.pad(totals.w[..., :-1, :], (0, 0, 1, 0)))  # exclusive: chunk c gets chunks 0..c−1
    joined = combine(ScanState(carry.m.unsqueeze(-1), carry.u.unsqueeze(-1), carry.w.unsqueeze(-2)), local)
    return ScanState(joined.m.flatten(-2)[..., :n], joined.u.flatten(-2)[..., :n], joined.w.flatten(-3, -2)[..., :n, :])


def prefix_scan(
    s: torch.Tensor, v: torch.Tensor, initial: ScanState | None = None, chunk: int = CHUNK,
) -> ScanState:
    """The states of every prefix of scores ``s (..., N)`` and values ``v (..., N, Dv)`` (leading dims broadcast),
    continuing from the state ``initial`` (``m, u (...)``, ``w (..., Dv)``) of earlier positions if given.

    Returns ``m, u (..., N)`` and ``w (..., N, Dv)``; fp16/bf16 inputs are scanned in fp32."""
    compute = torch.float32 if s.dtype in (torch.float16, torch.bfloat16) else s.dtype
    s, v = s.to(compute), v.to(compute)
    prefixes = _scan(ScanState(s, torch.ones_like(s), v), chunk)
    if initial is None:
        return prefixes
    start = ScanState(initial.m.unsqueeze(-1), initial.u.unsqueeze(-1), initial.w.unsqueeze(-2))
    return combine(start, prefixes)


def last(state: ScanState) -> ScanState:
    """The state of the whole run from the states of its prefixes (the last position's)."""
    return ScanState(state.m[..., -1], state.u[..., -1], state.w[..., -1, :])


def finish(state: ScanState) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of prefix states: ``o = w / u`` and ``lse = m + log u`` (natural log), 0 and ``−inf`` where
    nothing is seen (``u = 0``), with finite gradients."""
    seen = state.u > 0
    u = torch.where(seen, state.u, torch.ones_like(state.u))
    out = (state.w / u.unsqueeze(-1)).masked_fill(~seen.unsqueeze(-1), 0.0)
    lse = torch.where(seen, _stabiliser(state.m) + torch.log(u), torch.full_like(u, float("-inf")))
    return out, lse
