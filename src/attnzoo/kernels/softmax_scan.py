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

The fast form (:func:`prefix_attention`), a chunked scan chosen over a log-depth Hillis–Steele scan by measurement
(docs/s-layers.md), cuts the positions into chunks of ``CHUNK`` and makes three passes:

1. each chunk's total ``(m, u, w)`` (:func:`_chunk_totals`: one exponential per position, one matrix-vector product
   per chunk);
2. the exclusive scan of the totals — what precedes each chunk — by :func:`_scan`, the same chunked scan on the
   ``N / C`` totals, recursively (``N / C²``...), where inside a chunk the inclusive prefixes come at once from the
   lower-triangular weights ``A_tj = e^{m_j − r_t}`` (``r_t`` the running max, :func:`torch.cummax`);
3. the outputs (:func:`_chunk_outputs`): per chunk, the weights of its own positions and of its carry, relative to the
   larger of the two maxima and divided by ``u_t``, so ``o_t`` comes out of one matmul plus a rank-one term; no
   per-position ``(m, u, w)`` is materialised. The chunks of every head form one flat batch, processed in groups of
   :data:`GROUP_BUDGET` elements so that the temporaries stay in cache (without autograd the groups write straight into
   the output).

Time O(N·C·Dv), memory O(N·Dv) plus a group's ``C×C`` weights: linear in N. Padding uses the neutral element
``(−inf, 0, 0)``. Masked positions (score ``−inf``) weigh 0; a prefix that sees nothing (``u = 0``) gives output 0 and
log-sum-exp ``−inf``, with finite gradients.

Gradients: the running maxima are only stabilisers — ``o`` and ``log u + m`` do not depend on them — so every state's
``m`` is detached; gradients flow through the element scores inside the exponentials and through ``u``, ``w``. This is
exact, and saves differentiating ``cummax``.

Broadcasting: leading dims of ``s (..., N)`` and ``v (..., N, Dv)`` broadcast (GQA: query heads as an extra dim of
``s``, their key head's values with size 1 there; the values are then expanded per query head once).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

CHUNK = 64  # positions per chunk of the scan (measured fastest of 16/32/64/128 on CPU: docs/s-layers.md)
GROUP_BUDGET = 1 << 20  # elements of one chunk group's weights and outputs (4 MiB in fp32): they stay in cache


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


def _exclusive(totals: ScanState, initial: ScanState | None, chunk: int) -> ScanState:
    """What precedes each chunk: ``initial`` (if any) followed by the chunks before it, from the chunks' totals
    ``(..., nc)`` (their inclusive scan shifted by one, the first chunk getting the neutral element)."""
    inclusive = _scan(totals, chunk)
    carry = ScanState(F.pad(inclusive.m[..., :-1], (1, 0), value=float("-inf")), F.pad(inclusive.u[..., :-1], (1, 0)),
                      F.pad(inclusive.w[..., :-1, :], (0, 0, 1, 0)))
    if initial is None:
        return carry
    return combine(ScanState(initial.m.unsqueeze(-1), initial.u.unsqueeze(-1), initial.w.unsqueeze(-2)), carry)


def _chunk_totals(s: torch.Tensor, v: torch.Tensor) -> ScanState:
    """Each chunk's ``(m, u, w)`` from scores ``s (rows, C)`` and values ``v (rows, C, Dv)``: one exponential per
    position and one matrix-vector product per chunk."""
    m = s.detach().amax(-1)
    e = torch.exp(s - _stabiliser(m).unsqueeze(-1))
    return ScanState(m, e.sum(-1), (e.unsqueeze(-2) @ v).squeeze(-2))


def _chunk_outputs(
    s: torch.Tensor, v: torch.Tensor, carry: ScanState, later: torch.Tensor, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of every position of chunks ``s (g, C)``, ``v (g, C, Dv)`` preceded by ``carry`` ``(g)``: the
    chunk's lower-triangular weights rescaled to the larger of its running max and the carry's, divided by ``u_t``, in
    one matmul (into ``out`` if given), plus the carry's rank-one term."""
    running = torch.cummax(s.detach(), dim=-1).values
    ref = _stabiliser(torch.maximum(carry.m.unsqueeze(-1), running))  # (g, C)
    weights = torch.exp((s.unsqueeze(-2) - ref.unsqueeze(-1)).masked_fill(later, float("-inf")))
    before = torch.exp(carry.m.unsqueeze(-1) - ref)
    u = before * carry.u.unsqueeze(-1) + weights.sum(-1)
    seen = u > 0
    u = torch.where(seen, u, torch.ones_like(u))
    o = torch.matmul(weights / u.unsqueeze(-1), v, out=out)
    o = o.addcmul_((before / u).unsqueeze(-1), carry.w.unsqueeze(-2))
    return o, torch.where(seen, ref + torch.log(u), torch.full_like(u, float("-inf")))


def prefix_attention(
    s: torch.Tensor, v: torch.Tensor, initial: ScanState | None = None, chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, ScanState]:
    """Softmax attention over every prefix of scores ``s (..., N)`` and values ``v (..., N, Dv)`` (leading dims
    broadcast), continuing from the state ``initial`` (``m, u (...)``, ``w (..., Dv)``) of earlier positions if given.

    Returns ``o (..., N, Dv)``, ``lse (..., N)`` (0 and ``−inf`` where no key is visible yet) and the state of the
    whole run (``initial`` included). fp16/bf16 inputs are computed in fp32 (the outputs too).

    Three passes: the chunks' totals (:func:`_chunk_totals`), their exclusive scan (:func:`_exclusive`, recursive on
    ``N / C`` elements), then the outputs group of chunks by group (:func:`_chunk_outputs`), each group's temporaries
    under :data:`GROUP_BUDGET` elements so that they stay in cache. The chunks of every head are one flat batch, so a
    group is a contiguous slice; without autograd the groups write straight into the output. No per-position
    ``(m, u, w)`` is materialised."""
    compute = torch.float32 if s.dtype in (torch.float16, torch.bfloat16) else s.dtype
    s, v = s.to(compute), v.to(compute)
    n, dv = s.shape[-1], v.shape[-1]
    chunk = min(chunk, n)
    pad = -n % chunk
    if pad:
        s, v = F.pad(s, (0, pad), value=float("-inf")), F.pad(v, (0, 0, 0, pad))
    lead = torch.broadcast_shapes(s.shape[:-1], v.shape[:-2])
    s = s.expand(*lead, -1).reshape(-1, chunk)  # (L·nc, C): every head's chunks
    v = v.expand(*lead, -1, dv).reshape(-1, chunk, dv)  # a copy only where v is broadcast (GQA)
    totals = _chunk_totals(s, v)
    grouped = ScanState(*(t.view(*lead, -1) for t in totals[:2]), totals.w.view(*lead, -1, dv))
    carry = _exclusive(grouped, initial, chunk)
    whole = combine(last(carry), last(grouped))
    carry = ScanState(*(t.reshape(-1) for t in carry[:2]), carry.w.reshape(-1, dv))
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=s.device).triu_(1)
    rows = s.shape[0]
    group = max(1, GROUP_BUDGET // (chunk * (chunk + dv)))
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (s, v, *carry))
    out = None if training else v.new_empty(rows, chunk, dv)
    parts = [_chunk_outputs(s[a : a + group], v[a : a + group], ScanState(*(t[a : a + group] for t in carry)), later,
                            None if out is None else out[a : a + group])
             for a in range(0, rows, group)]
    if out is None:
        out = torch.cat([o for o, _ in parts])
    lse = torch.cat([x for _, x in parts])
    return out.view(*lead, -1, dv)[..., :n, :], lse.view(*lead, -1)[..., :n], whole


def last(state: ScanState) -> ScanState:
    """The state of the whole run from the states of its prefixes (the last position's)."""
    return ScanState(state.m[..., -1], state.u[..., -1], state.w[..., -1, :])
