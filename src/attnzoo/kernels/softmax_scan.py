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
(docs/s-layers.md), cuts the positions into chunks of ``CHUNK`` and walks the sequence once, in blocks of whole chunks
(every head at once) whose temporaries stay under :data:`GROUP_BUDGET` elements, so they stay in cache. Per block:

1. each chunk's total ``(m, u, w)`` (:func:`_chunk_totals`: one exponential per position, one matrix-vector product
   per chunk);
2. what precedes each chunk: the state of the blocks before, then the exclusive scan of the block's totals
   (:func:`_exclusive`, by :func:`_scan`: the same chunking on the totals, recursively, where inside a chunk the
   inclusive prefixes come at once from the lower-triangular weights ``A_tj = e^{m_j − r_t}``, ``r_t`` the running
   max by :func:`torch.cummax`);
3. the outputs (:func:`_chunk_outputs`): per chunk, the weights of its own positions and of its carry, relative to the
   larger of the two maxima and divided by ``u_t``, so ``o_t`` comes out of one matmul plus a rank-one term; no
   per-position ``(m, u, w)`` is materialised;

and the block's total carried on to the next. The values are read once and the outputs written once. Time O(N·C·Dv),
memory O(N·Dv) plus one block's temporaries: linear in N. Padding uses the neutral element ``(−inf, 0, 0)``. Masked
positions (score ``−inf``) weigh 0; a prefix that sees nothing (``u = 0``) gives output 0 and log-sum-exp ``−inf``,
with finite gradients.

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

CHUNK = 16  # positions per chunk (measured fastest of 8/16/32/64 with Dv = 64 on CPU: docs/s-layers.md)
GROUP_BUDGET = 1 << 20  # elements of one block's weights and outputs (4 MiB in fp32): they stay in cache


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


def _shifted(inclusive: ScanState) -> ScanState:
    """Exclusive prefix states from inclusive ones: position ``c`` gets the state of ``0..c−1`` (the first, the
    neutral element)."""
    return ScanState(F.pad(inclusive.m[..., :-1], (1, 0), value=float("-inf")), F.pad(inclusive.u[..., :-1], (1, 0)),
                     F.pad(inclusive.w[..., :-1, :], (0, 0, 1, 0)))


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
    carry = _shifted(_scan(last(local), chunk))
    joined = combine(ScanState(carry.m.unsqueeze(-1), carry.u.unsqueeze(-1), carry.w.unsqueeze(-2)), local)
    return ScanState(joined.m.flatten(-2)[..., :n], joined.u.flatten(-2)[..., :n], joined.w.flatten(-3, -2)[..., :n, :])


def _exclusive(totals: ScanState, initial: ScanState | None, chunk: int) -> ScanState:
    """What precedes each chunk: ``initial`` (if any) followed by the chunks before it, from the chunks' totals
    ``(..., nc)`` (their inclusive scan shifted by one, the first chunk getting the neutral element)."""
    carry = _shifted(_scan(totals, chunk))
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
    s: torch.Tensor, v: torch.Tensor, carry: ScanState, later: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of every position of chunks ``s (g, C)``, ``v (g, C, Dv)`` preceded by ``carry`` ``(g)``: the
    chunk's lower-triangular weights rescaled to the larger of its running max and the carry's, divided by ``u_t``, in
    one matmul, plus the carry's rank-one term."""
    running = torch.cummax(s.detach(), dim=-1).values
    ref = _stabiliser(torch.maximum(carry.m.unsqueeze(-1), running))  # (g, C)
    weights = torch.exp((s.unsqueeze(-2) - ref.unsqueeze(-1)).masked_fill(later, float("-inf")))
    before = torch.exp(carry.m.unsqueeze(-1) - ref)
    u = before * carry.u.unsqueeze(-1) + weights.sum(-1)
    seen = u > 0
    u = torch.where(seen, u, torch.ones_like(u))
    o = (weights / u.unsqueeze(-1)) @ v
    o = o.addcmul_((before / u).unsqueeze(-1), carry.w.unsqueeze(-2))
    return o, torch.where(seen, ref + torch.log(u), torch.full_like(u, float("-inf")))


def prefix_attention(
    s: torch.Tensor, v: torch.Tensor, initial: ScanState | None = None, chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, ScanState]:
    """Softmax attention over every prefix of scores ``s (..., N)`` and values ``v (..., N, Dv)`` (leading dims
    broadcast), continuing from the state ``initial`` (``m, u (...)``, ``w (..., Dv)``) of earlier positions if given.

    Returns ``o (..., N, Dv)``, ``lse (..., N)`` (0 and ``−inf`` where no key is visible yet) and the state of the
    whole run (``initial`` included). fp16/bf16 inputs are computed in fp32 (the outputs too).

    One pass in blocks of whole chunks (see the module docstring); without autograd the blocks write straight into
    the output, with it their outputs are concatenated."""
    compute = torch.float32 if s.dtype in (torch.float16, torch.bfloat16) else s.dtype
    s, v = s.to(compute), v.to(compute)
    n, dv = s.shape[-1], v.shape[-1]
    chunk = min(chunk, n)
    pad = -n % chunk
    if pad:
        s, v = F.pad(s, (0, pad), value=float("-inf")), F.pad(v, (0, 0, 0, pad))
    lead = torch.broadcast_shapes(s.shape[:-1], v.shape[:-2])
    s = s.expand(*lead, -1).reshape(-1, n + pad)  # (L, N'): every head's scores
    v = v.expand(*lead, -1, dv).reshape(-1, n + pad, dv)  # a copy only where v is broadcast (GQA)
    heads = s.shape[0]
    state = None if initial is None else ScanState(initial.m.reshape(heads), initial.u.reshape(heads),
                                                   initial.w.reshape(heads, dv))
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=s.device).triu_(1)
    block = chunk * max(1, GROUP_BUDGET // (heads * chunk * (chunk + dv)))
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (s, v, *(state or ())))
    out = None if training else v.new_empty(heads, n + pad, dv)
    lse = None if training else s.new_empty(heads, n + pad)
    outs, lses = [], []
    # split, not sliced per block: the backward of a split is one concatenation, of a slice a zero-filled full copy
    for a, sb, vb in zip(range(0, n + pad, block), s.split(block, 1), v.split(block, 1), strict=True):
        sb, vb = sb.reshape(-1, chunk), vb.reshape(-1, chunk, dv)  # (L·g, C), (L·g, C, Dv)
        totals = _chunk_totals(sb, vb)
        totals = ScanState(totals.m.view(heads, -1), totals.u.view(heads, -1), totals.w.view(heads, -1, dv))
        carry = _exclusive(totals, state, chunk)
        o, x = _chunk_outputs(sb, vb, ScanState(carry.m.reshape(-1), carry.u.reshape(-1), carry.w.reshape(-1, dv)),
                              later)
        state = combine(last(carry), last(totals))
        if training:
            outs.append(o.view(heads, -1, dv))
            lses.append(x.view(heads, -1))
        else:
            out[:, a : a + block] = o.view(heads, -1, dv)
            lse[:, a : a + block] = x.view(heads, -1)
    if training:
        out, lse = torch.cat(outs, 1), torch.cat(lses, 1)
    whole = ScanState(state.m.view(lead), state.u.view(lead), state.w.view(*lead, dv))
    return out.view(*lead, -1, dv)[..., :n, :], lse.view(*lead, -1)[..., :n], whole


def last(state: ScanState) -> ScanState:
    """The state of the whole run from the states of its prefixes (the last position's)."""
    return ScanState(state.m[..., -1], state.u[..., -1], state.w[..., -1, :])
