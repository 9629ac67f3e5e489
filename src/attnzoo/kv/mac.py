"""K12 MAC-Attention: decoding that reuses the attention of a matching recent query.

Paper: "MAC-Attention: a Match-Amend-Complete Scheme for Fast and Accurate Attention Computation" (Yao et al.,
arXiv:2604.00235; code at github.com/YJHMITWEB/MAC-Attention, not consulted here). Decoding re-reads the whole KV
cache for every new token; MAC reuses the attention a similar recent query already computed over the old keys and
recomputes only a short band of recent keys, so a hit costs ``O(band + history)`` instead of ``O(N)``.

As implemented, for each new query ``q_t`` of each (batch, head) row, the cache holding keys ``0 … N−1`` (the new
token's key included):

- **Match**: the ring of the ``history`` most recent queries of this row (each with a *cut* ``c_r`` and the
  normalised output and log-sum-exp ``(O_r, L_r)`` of that query over keys ``[0, c_r)``) is compared with ``q_t`` by
  cosine similarity; the most similar entry with similarity ``≥ threshold`` is the match. No match (a *miss*) sets
  ``c = 0`` and an empty reused part (``L = −inf``).
- **Amend**: ``q_t`` attends exactly to keys ``[c, N − band)`` (on a hit these are only the keys added since the
  matched query was stored, at most ``history`` of them; on a miss the whole old cache) and to the band
  ``[N − band, N)``.
- **Complete**: ``(O_old, L_old) = merge((O_r, L_r), [c, N − band))`` and the output is
  ``merge((O_old, L_old), band)`` (:func:`attnzoo.kernels.merge.merge`, exact log-sum-exp merge). ``(O_old, L_old)``
  with cut ``N − band`` is pushed into the ring for later queries.

The only approximation is ``(O_r, L_r)``: the matched query's attention over keys ``[0, c_r)`` stands in for
``q_t``'s. A miss therefore gives exactly plain softmax decoding (the same keys, split in disjoint parts and
merged), and a query repeated exactly reproduces plain decoding up to rounding.

Choices (the paper's full text was not read; its public code's matching rule was, see ``match``):

- ``match="cosine"`` (default): the most similar entry by cosine similarity, a hit when it is ``≥ threshold``
  (``threshold > 1`` never matches). ``match="l2"`` is the rule of the authors' public kernels
  (github.com/YJHMITWEB/MAC-Attention, ``mac_decode_persistent.cu``): the nearest entry by squared L2 distance, a hit
  when ``‖q − q_r‖² < 2·D·(1 − threshold)²`` (their default ``threshold`` 0.45; ``threshold ≥ 1`` never matches);
- the paper matches *pre-RoPE* queries: ``match_q`` (same shape as ``q``) is the query that is matched and stored in
  the ring, while ``q`` is attended (default: ``q`` itself, right for models without rotary embeddings);
- the ring holds one entry per decoded or last-prompt position and row, so a cut is never more than ``history``
  keys behind ``N − band``: the amend window has a fixed size ``history`` (masked per row);
- the reused part is stored *per entry* as ``(O, L)`` over keys older than that entry's band, which makes the merge
  exact over disjoint key sets;
- one query per step (``T > 1`` runs token by token); no ragged batches (every sequence has the same length); MHA
  and GQA (``H`` a multiple of ``H_kv``).

API (function-level, beside :func:`attnzoo.prefill` / :func:`attnzoo.step`, which it leaves unchanged):
:func:`mac_prefill` then :func:`mac_step`; :attr:`MACState.hit_rate` reports the fraction of matched (row, token)
lookups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnzoo.errors import fail
from attnzoo.kernels.dense import sdpa_attention, softmax_attention_lse
from attnzoo.kernels.merge import merge

MATCHES = ("cosine", "l2")


@dataclass
class MACState:
    """Decoding state: the KV cache (``k``/``v`` buffers filled to ``length``) and the ring of recent queries.

    Ring tensors, per row ``(B, H)`` and entry ``R = history``: ``ring_q (B, H, R, D)``, ``ring_out (B, H, R, Dv)``,
    ``ring_lse (B, H, R)``, ``ring_cut (R,)`` (keys ``[0, cut)`` covered; ``-1`` marks an empty entry). ``hits`` and
    ``lookups`` count matched and attempted (row, token) lookups since the prefill.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int
    scale: float
    threshold: float
    history: int
    band: int
    match: str
    ring_q: torch.Tensor
    ring_out: torch.Tensor
    ring_lse: torch.Tensor
    ring_cut: torch.Tensor
    next_slot: int = 0
    hits: int = 0
    lookups: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of (row, token) lookups that matched a recent query (0 before any step)."""
        return self.hits / self.lookups if self.lookups else 0.0


def mac_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *, threshold: float = 0.95,
    history: int = 16, band: int = 64, match: str = "cosine", match_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MACState]:
    """Exact causal softmax attention over a prompt, returning ``(out, state)`` to continue with :func:`mac_step`.

    ``q (B, H, S, D)``, ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)``; ``out (B, H, S, Dv)``. The last ``history``
    prompt queries seed the ring. ``threshold``: what a match needs (``match="cosine"``: the cosine similarity,
    ``> 1`` disables reuse; ``"l2"``: ``‖q − q_r‖² < 2·D·(1 − threshold)²``, ``≥ 1`` disables it); ``history``: the
    ring size; ``band``: how many most recent keys are always recomputed; ``match_q``: the queries to match (pre-RoPE,
    as the paper does), default ``q``.
    """
    _check_inputs(q, k, v)
    if match not in MATCHES:
        raise fail("match", f"one of {list(MATCHES)}", repr(match))
    match_q = _checked_match_q(match_q, q)
    if not isinstance(history, int) or history < 1:
        raise fail("history", "an int >= 1", history)
    if not isinstance(band, int) or band < 1:
        raise fail("band", "an int >= 1", band)
    if not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise fail("threshold", "a number (cosine similarity, > 1 never matches)", threshold)
    b, h, s, d = q.shape
    scale_ = d ** -0.5 if scale is None else float(scale)
    pos = torch.arange(s, device=q.device)
    out = sdpa_attention(q, k, v, causal=True, scale=scale_, mask=None, bias=None)
    capacity = max(2 * s, s + 1024)
    k_buf = k.new_empty(b, k.shape[1], capacity, d)
    v_buf = v.new_empty(b, v.shape[1], capacity, v.shape[-1])
    k_buf[:, :, :s] = k
    v_buf[:, :, :s] = v
    state = MACState(
        k=k_buf, v=v_buf, length=s, scale=scale_, threshold=float(threshold), history=history, band=band,
        match=match, ring_q=q.new_zeros(b, h, history, d), ring_out=q.new_zeros(b, h, history, v.shape[-1]),
        ring_lse=q.new_full((b, h, history), float("-inf")),
        ring_cut=torch.full((history,), -1, dtype=torch.long, device=q.device),
    )
    seeds = pos[max(0, s - history):]
    cuts = (seeds + 1 - band).clamp(min=0)
    old_out, old_lse = softmax_attention_lse(q[:, :, seeds], k, v, scale_, mask=pos[None, :] < cuts[:, None])
    for i, cut in enumerate(cuts.tolist()):
        _push(state, match_q[:, :, seeds[i]], old_out[:, :, i], old_lse[:, :, i], cut)
    return out, state


def mac_step(
    state: MACState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, match_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MACState]:
    """Decode ``T`` new tokens (``q (B, H, T, D)``, ``k``/``v (B, Hkv, T, ·)``) token by token; ``(out, state)``.

    ``match_q``: the queries matched against the ring (pre-RoPE), default ``q``. The state is updated in place (its
    buffers grow by doubling) and returned.
    """
    if not isinstance(state, MACState):
        raise fail("state", "a MACState from mac_prefill or mac_step", type(state).__name__)
    _check_inputs(q, k, v)
    if q.shape[0] != state.ring_q.shape[0] or q.shape[1] != state.ring_q.shape[1] or k.shape[1] != state.k.shape[1]:
        raise fail("q", f"batch and heads of the prefill {tuple(state.ring_q.shape[:2])}", tuple(q.shape[:2]))
    match_q = _checked_match_q(match_q, q)
    outs = [_step_one(state, q[:, :, t], k[:, :, t:t + 1], v[:, :, t:t + 1], match_q[:, :, t])
            for t in range(q.shape[2])]
    return torch.stack(outs, dim=2), state


def _step_one(state: MACState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, match_q: torch.Tensor,
              ) -> torch.Tensor:
    """One token: append its key/value, match, amend, complete, push; returns ``out (B, H, Dv)``."""
    _append(state, k, v)
    n, band, hist = state.length, state.band, state.history
    split = max(n - band, 0)  # keys [split, n): the band, always recomputed
    reused_out, reused_lse, cut, hit = _match(state, match_q)
    q4 = q.unsqueeze(2)
    band_out, band_lse = softmax_attention_lse(q4, state.k[:, :, split:n], state.v[:, :, split:n], state.scale)
    start = max(split - hist, 0)  # a hit's cut is never older than this: keys [cut, split) lie in [start, split)
    window = torch.arange(start, split, device=q.device)
    fresh_out, fresh_lse = softmax_attention_lse(
        q4, state.k[:, :, start:split], state.v[:, :, start:split], state.scale,
        mask=(window >= cut.unsqueeze(-1)).unsqueeze(2),
    )
    fresh_out, fresh_lse = fresh_out.squeeze(2), fresh_lse.squeeze(2)
    if split > 0:  # a miss (cut 0) needs every old key, not only the window
        _old_keys_attention(state, q, ~hit, split, fresh_out, fresh_lse)
    old_out, old_lse = merge([reused_out, fresh_out], [reused_lse, fresh_lse])
    out, _ = merge([old_out, band_out.squeeze(2)], [old_lse, band_lse.squeeze(2)])
    state.hits += int(hit.sum())
    state.lookups += hit.numel()
    _push(state, match_q, old_out, old_lse, split)
    return out


def _match(state: MACState, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reused ``(out, lse)`` of each row, its cut ``(B, H)`` and whether it matched (misses: empty, cut 0)."""
    empty = state.ring_cut < 0
    if state.match == "cosine":
        sim = torch.nn.functional.cosine_similarity(state.ring_q, q.unsqueeze(2), dim=-1)
        best, slot = sim.masked_fill(empty, float("-inf")).max(dim=-1)
        hit = best >= state.threshold
    else:
        dist = (state.ring_q - q.unsqueeze(2)).square().sum(dim=-1)
        best, slot = dist.masked_fill(empty, float("inf")).min(dim=-1)
        radius = 2 * q.shape[-1] * (1 - state.threshold) ** 2 if state.threshold < 1 else 0.0  # ≥ 1: never
        hit = best < radius
    gather = slot.unsqueeze(-1)
    out = state.ring_out.gather(2, gather.unsqueeze(-1).expand(-1, -1, -1, state.ring_out.shape[-1])).squeeze(2)
    lse = state.ring_lse.gather(2, gather).squeeze(2)
    cut = torch.where(hit, state.ring_cut[slot], torch.zeros_like(slot))
    return out * hit.unsqueeze(-1), lse.masked_fill(~hit, float("-inf")), cut, hit


def _old_keys_attention(
    state: MACState, q: torch.Tensor, miss: torch.Tensor, split: int, out: torch.Tensor, lse: torch.Tensor,
) -> None:
    """Write into ``out (B, H, Dv)``/``lse (B, H)`` the exact attention over keys ``[0, split)`` of the ``miss`` rows.

    All groups in one call when each has a missing row, else one (batch, KV head) group at a time; always on views
    of the cache (no copy of the keys), so a computed group costs what plain decoding costs for it.
    """
    group = q.shape[1] // state.k.shape[1]
    groups = miss.unflatten(1, (-1, group)).any(-1)
    if bool(groups.all()):  # every group has a miss: one call over the whole cache
        o, s = softmax_attention_lse(q.unsqueeze(2), state.k[:, :, :split], state.v[:, :, :split], state.scale)
        out.copy_(torch.where(miss.unsqueeze(-1), o[:, :, 0], out))
        lse.copy_(torch.where(miss, s[:, :, 0], lse))
        return
    for b, kv in groups.nonzero().tolist():
        heads = slice(kv * group, (kv + 1) * group)
        o, s = softmax_attention_lse(q[b:b + 1, heads, None], state.k[b:b + 1, kv:kv + 1, :split],
                                     state.v[b:b + 1, kv:kv + 1, :split], state.scale)
        rows = miss[b, heads]
        out[b, heads] = torch.where(rows.unsqueeze(-1), o[0, :, 0], out[b, heads])
        lse[b, heads] = torch.where(rows, s[0, :, 0], lse[b, heads])


def _append(state: MACState, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write one token's key/value after ``length``, doubling the buffers when full."""
    if state.length == state.k.shape[2]:
        state.k = torch.cat([state.k, torch.empty_like(state.k)], dim=2)
        state.v = torch.cat([state.v, torch.empty_like(state.v)], dim=2)
    state.k[:, :, state.length] = k[:, :, 0]
    state.v[:, :, state.length] = v[:, :, 0]
    state.length += 1


def _push(state: MACState, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cut: int) -> None:
    """Store a query ``(B, H, D)`` with its ``(out, lse)`` over keys ``[0, cut)`` in the ring's oldest entry."""
    slot = state.next_slot
    state.ring_q[:, :, slot] = q
    state.ring_out[:, :, slot] = out
    state.ring_lse[:, :, slot] = lse
    state.ring_cut[slot] = cut
    state.next_slot = (slot + 1) % state.history


def _checked_match_q(match_q: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """``match_q`` if it is shaped and typed like ``q`` (``q`` itself when None)."""
    if match_q is None:
        return q
    if not isinstance(match_q, torch.Tensor) or match_q.shape != q.shape or match_q.dtype != q.dtype:
        got = f"{tuple(match_q.shape)} {match_q.dtype}" if isinstance(match_q, torch.Tensor) else type(match_q).__name__
        raise fail("match_q", f"a tensor shaped and typed like q {tuple(q.shape)} {q.dtype}", got)
    return match_q


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes: ``q (B, H, S, D)``, ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)`` with ``H`` a multiple of ``Hkv``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise fail(name, "a 4-d tensor (B, H, S, D)", getattr(t, "shape", type(t).__name__))
    if k.shape[:3] != v.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise fail("k", f"(B, Hkv, S, {q.shape[-1]}) matching v {tuple(v.shape)}", tuple(k.shape))
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise fail("q", f"batch and length of k {tuple(k.shape)}, heads a multiple of {k.shape[1]}", tuple(q.shape))
