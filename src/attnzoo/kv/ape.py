"""K13 APE — adaptive parallel encoding: contexts prefilled independently, then decoding over their caches.

Paper: Yang, Chen, Chen, "APE: Faster and Longer Context-Augmented Generation via Adaptive Parallel Encoding"
(arXiv:2502.05431, ICLR 2025); public code github.com/Infini-AI-Lab/APE (read for the formula, not copied).

A request is ``[shared prefix P; contexts C_1 … C_N; query Q; generated tokens]``. Sequential encoding prefills the
concatenation — quadratic in ``Σ|C_i|`` and redone for every selection of contexts. Parallel encoding prefills each
context on its own after the same prefix, so each context's KV costs ``O(|C_i| (P + |C_i|))`` and can be cached.

**Encoding** (:func:`ape_encode`, exact): token ``t`` of context ``i`` attends causally to ``[P; C_i[0..t]]`` and to no
other context. Computed as two key parts merged by log-sum-exp (:func:`attnzoo.kernels.merge.merge_parts`): every
context's queries stacked against the prefix in one call (the prefix read once), and each context against itself,
causally (one call per context: ragged lengths need no padding). Positions are reused across contexts: every context
starts right after the prefix and the query right after the longest context (:func:`ape_positions`); the caller
applies its positional encoding (RoPE) with those positions before passing ``q``/``k``.

**Query and decoding** (:func:`ape_attention`; :func:`ape_prefill` then :func:`ape_step`): a query token with logits
``s_j = scale · q·k_j`` reads two key sets — ``O = [P; its own tokens up to itself]`` (causal) with plain logits, and
the contexts' concatenated caches ``C = C_1 ∪ … ∪ C_N`` with temperature ``T`` — combined with scaling factor ``S``::

    L_O = log Σ_{j∈O} exp(s_j)          O_O = Σ_{j∈O} exp(s_j − L_O) v_j
    L_C = log Σ_{j∈C} exp(s_j / T)      O_C = Σ_{j∈C} exp(s_j / T − L_C) v_j
    out = (exp(S·T·L_C) O_C + exp(L_O) O_O) / (exp(S·T·L_C) + exp(L_O))

The contexts' distribution is sharpened by ``T`` and their total mass ``Z_C = Σ exp(s/T)`` enters as ``Z_C^{S·T}``
(``T·L_C`` tends to ``max s`` as ``T → 0`` and is the ordinary log-sum-exp at ``T = 1``). Per key, the weight is
``exp(s_j)`` for ``j ∈ O`` and ``exp(s_j / T) · Z_C^{S·T − 1}`` for ``j ∈ C``, normalised over all keys. At
``T = S = 1`` this is exactly softmax attention over ``[P; C; own tokens]``; with one context, plain causal attention
over the sequence ``[P; C_1; Q]`` — APE changes nothing then, which the tests check. :func:`ape_reference` is this
definition computed densely; the fast path (:func:`ape_attention`) attends three parts with
:func:`attnzoo.kernels.parts.part_attention` — the prefix, the contexts at ``scale / T``, the own tokens causally —
replaces the contexts' log-sum-exp ``L_C`` by ``S·T·L_C`` and merges the three exactly; the merged log-sum-exp
(``return_lse=True``) is ``log(exp(L_O) + exp(S·T·L_C))``, the normaliser above.

Choices (each checked against the public code; the paper's own equations were not available here, so the formula is
the one the code implements — ``llama_attention_prefill_query`` multiplies the contexts' flash log-sum-exp, taken at
softmax scale ``1 / (√d · T)``, by ``S·T`` and softmaxes it against the other part's; its dense twin in the RAG
experiments computes ``logsumexp(s / T) · T · S`` — and the paper's wording "shared prefix, attention temperature,
scaling factor" agrees):

- defaults ``T = S = 0.9``: the public README and demo ("preserving over 90% performance on few-shot tasks"); the
  public experiments set them per task (e.g. ``T = 0.9, S = 1.0`` for RAG, others commented out) and the paper
  names the sensitivity to them as a limitation. Any positive finite ``T`` and ``S`` is accepted (the workshop
  abstract speaks of a *lower* temperature; the public values are all ``≤ 1``), one value for every head;
- positions as in the public demo: contexts are encoded at the positions following the prefix (right-padded to
  the longest, so each starts at ``P``) and the query continues from the largest position used, ``P + max L_i``;
- the shared prefix is stored once, as the public demo keeps one copy of it in front of the contexts' tokens
  (batch 1 shared by every sequence, or one per sequence here), and is never tempered: with the query's own tokens it
  is the plain part ``O`` (it holds the attention sink, the reason the paper prepends it); an empty prefix
  (``P = 0``) is allowed and gives plain parallel encoding;
- contexts are not masked from one another at query time: the query reads their union as one set, so where one
  context ends does not matter after encoding (:class:`APEState` keeps their concatenation);
- the query's own and generated tokens live in a :class:`~attnzoo.kv.cache.KVCache` (amortised appends); the prefix
  and own tokens are attended as two parts (no prefix copy per step) and merged with the contexts' part;
- the public code casts the log-sum-exps to the model dtype (bf16) before combining; here the merge accumulates in
  fp32 (fp64 stays fp64);
- differentiable: under autograd every part uses the dense kernel whose log-sum-exp has a gradient;
- the prefix's own encoding is ordinary causal attention (``az.attention``), not part of this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnzoo import masks
from attnzoo.errors import fail
from attnzoo.kernels.merge import merge_parts
from attnzoo.kernels.parts import part_attention
from attnzoo.kv.cache import KVCache

DEFAULT_TEMPERATURE = 0.9
DEFAULT_SCALING = 0.9


def ape_positions(prefix_length: int, context_lengths: Sequence[int]) -> tuple[list[torch.Tensor], int]:
    """Positions with reuse across contexts: context ``i`` takes ``P … P + L_i − 1`` (every context starts after the
    prefix) and the query's first token ``P + max L_i``; returns ``(per-context position tensors, query start)``."""
    if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or prefix_length < 0:
        raise fail("prefix_length", "a non-negative int", repr(prefix_length))
    if not isinstance(context_lengths, (list, tuple)) or not context_lengths or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in context_lengths):
        raise fail("context_lengths", "a non-empty list of positive ints", repr(context_lengths))
    positions = [torch.arange(prefix_length, prefix_length + n) for n in context_lengths]
    return positions, prefix_length + max(context_lengths)


def ape_encode(
    prefix_k: torch.Tensor, prefix_v: torch.Tensor, contexts_q: Sequence[torch.Tensor],
    contexts_k: Sequence[torch.Tensor], contexts_v: Sequence[torch.Tensor], *, scale: float | None = None,
) -> list[torch.Tensor]:
    """Parallel encoding: context ``i``'s attention output ``(B, H, L_i, Dv)`` over ``[prefix; context i]``, causal.

    ``prefix_k``/``prefix_v`` (1 or B, Hkv, P, D/Dv): the shared prefix's keys and values; ``contexts_q[i]``
    (B, H, L_i, D), ``contexts_k[i]``/``contexts_v[i]`` (B, Hkv, L_i, D/Dv): each context's projections (lengths may
    differ). ``scale`` defaults to ``D ** -0.5``. Exact (no temperature: APE only adjusts the query's attention).
    """
    _check_contexts(prefix_k, prefix_v, contexts_k, contexts_v, batch=None, d=None)
    _check_context_queries(contexts_q, contexts_k, prefix_k)
    scale = _scale(scale, prefix_k.shape[-1])
    stacked = torch.cat(list(contexts_q), dim=2)  # every context's queries read the prefix in one call
    prefix_out, prefix_lse = part_attention(stacked, prefix_k, prefix_v, scale)
    outs, start = [], 0
    for q, k, v in zip(contexts_q, contexts_k, contexts_v, strict=True):
        end = start + q.shape[2]
        own = part_attention(q, k, v, scale, causal=True)
        outs.append(merge_parts([(prefix_out[:, :, start:end], prefix_lse[:, :, start:end]), own])[0])
        start = end
    return outs


def ape_reference(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, context_k: torch.Tensor,
    context_v: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor, *, temperature: float = DEFAULT_TEMPERATURE,
    scaling: float = DEFAULT_SCALING, scale: float | None = None,
) -> torch.Tensor:
    """APE's query attention computed densely from its definition (see the module docstring); the fast path's
    reference. Arguments as :func:`ape_attention`; computed in the inputs' dtype (fp64 for exactness tests)."""
    _check_attention(q, prefix_k, prefix_v, context_k, context_v, own_k, own_v)
    _check_factor("temperature", temperature)
    _check_factor("scaling", scaling)
    scale = _scale(scale, q.shape[-1])
    b, h, sq, _ = q.shape

    def per_head(t: torch.Tensor) -> torch.Tensor:  # (1 or B, Hkv, n, ·) -> (B, H, n, ·): K/V copied per query head
        return t.expand(b, -1, -1, -1).repeat_interleave(h // t.shape[1], dim=1)

    other_k = torch.cat([per_head(prefix_k), per_head(own_k)], dim=2)
    other_v = torch.cat([per_head(prefix_v), per_head(own_v)], dim=2)
    s_other = scale * q @ other_k.transpose(-1, -2)
    own_seen = masks.combine(True, None, sq, own_k.shape[2], q.device)  # query i: own keys up to itself
    seen = torch.cat([own_seen.new_ones(1, 1, sq, prefix_k.shape[2]), own_seen], dim=-1)
    s_other = s_other.masked_fill(~seen, float("-inf"))
    s_context = scale * q @ per_head(context_k).transpose(-1, -2) / temperature
    lse_other, out_other = torch.logsumexp(s_other, -1), torch.softmax(s_other, -1) @ other_v
    lse_context, out_context = torch.logsumexp(s_context, -1), torch.softmax(s_context, -1) @ per_head(context_v)
    weights = torch.softmax(torch.stack([scaling * temperature * lse_context, lse_other]), dim=0).unsqueeze(-1)
    return weights[0] * out_context + weights[1] * out_other


def ape_attention(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, context_k: torch.Tensor,
    context_v: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor, *, temperature: float = DEFAULT_TEMPERATURE,
    scaling: float = DEFAULT_SCALING, scale: float | None = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """APE attention ``(B, H, Sq, Dv)`` of query tokens over ``[prefix; contexts; own tokens]`` (module docstring).

    ``q`` (B, H, Sq, D): the last ``Sq`` own tokens; ``prefix_k``/``prefix_v`` (1 or B, Hkv, P, D/Dv);
    ``context_k``/``context_v`` (B, Hkv, C, D/Dv): the contexts' caches concatenated; ``own_k``/``own_v``
    (B, Hkv, n, D/Dv): the query's own tokens so far (``n ≥ Sq``; query ``i`` sees own keys ``j ≤ n − Sq + i``).
    ``temperature`` ``T`` and ``scaling`` ``S``: positive; ``scale`` defaults to ``D ** -0.5``. With
    ``return_lse=True`` the result is ``(out, lse)``, ``lse (B, H, Sq) = log(exp(L_O) + exp(S·T·L_C))``.
    """
    _check_attention(q, prefix_k, prefix_v, context_k, context_v, own_k, own_v)
    _check_factor("temperature", temperature)
    _check_factor("scaling", scaling)
    out, lse = _ape(q, prefix_k, prefix_v, context_k, context_v, own_k, own_v, temperature, scaling,
                    _scale(scale, q.shape[-1]))
    return (out, lse) if return_lse else out


@dataclass(frozen=True, eq=False)
class APEState:
    """Decoding state: the prefix (stored once), the contexts' caches concatenated, and the own tokens' cache.

    ``prefix_k``/``prefix_v`` (1 or B, Hkv, P, ·); ``context_k``/``context_v`` (B, Hkv, C, ·); ``own``: a
    :class:`~attnzoo.kv.cache.KVCache` of the query's and generated tokens; ``temperature``, ``scaling``, ``scale``
    as given to :func:`ape_prefill`.
    """

    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    context_k: torch.Tensor
    context_v: torch.Tensor
    own: KVCache
    temperature: float
    scaling: float
    scale: float


def ape_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    contexts_k: Sequence[torch.Tensor], contexts_v: Sequence[torch.Tensor], *,
    temperature: float = DEFAULT_TEMPERATURE, scaling: float = DEFAULT_SCALING, scale: float | None = None,
) -> tuple[torch.Tensor, APEState]:
    """The query's prefill: ``q`` (B, H, Sq, D), ``k``/``v`` (B, Hkv, Sq, D/Dv) its own tokens, attending with APE
    to the prefix and to every context (``contexts_k[i]``/``contexts_v[i]`` (B, Hkv, L_i, ·), as encoded by
    :func:`ape_encode`); returns ``(out (B, H, Sq, Dv), state)`` for :func:`ape_step`."""
    _check_query(q)
    _check_contexts(prefix_k, prefix_v, contexts_k, contexts_v, batch=q.shape[0], d=q.shape[-1])
    context_k, context_v = torch.cat(list(contexts_k), dim=2), torch.cat(list(contexts_v), dim=2)
    _check_attention(q, prefix_k, prefix_v, context_k, context_v, k, v, own_names=("k", "v"))
    _check_factor("temperature", temperature)
    _check_factor("scaling", scaling)
    if k.shape[2] != q.shape[2]:
        raise fail("k", f"{q.shape[2]} tokens (one per query token)", k.shape[2])
    state = APEState(prefix_k, prefix_v, context_k, context_v, KVCache.from_prompt(k, v), float(temperature),
                     float(scaling), _scale(scale, q.shape[-1]))
    return _step_output(state, q), state


def ape_step(state: APEState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, APEState]:
    """``T ≥ 1`` new tokens per sequence: ``q`` (B, H, T, D), ``k``/``v`` (B, Hkv, T, D/Dv), appended to the own
    tokens; returns ``(out (B, H, T, Dv), new state)`` — equal to :func:`ape_reference` over the whole."""
    if not isinstance(state, APEState):
        raise fail("state", "an APEState from ape_prefill", type(state).__name__)
    own = state.own
    b, hkv = own.keys.shape[:2]
    d, dv = own.keys.shape[-1], own.values.shape[-1]
    if q.dim() != 4 or q.shape[0] != b or q.shape[1] % hkv or q.shape[-1] != d:
        raise fail("q", f"shape ({b}, H, T, {d}) with H a multiple of {hkv} (from the state)", tuple(q.shape))
    if tuple(k.shape) != (b, hkv, q.shape[2], d):
        raise fail("k", f"shape {(b, hkv, q.shape[2], d)}", tuple(k.shape))
    if tuple(v.shape) != (b, hkv, q.shape[2], dv):
        raise fail("v", f"shape {(b, hkv, q.shape[2], dv)}", tuple(v.shape))
    state = APEState(state.prefix_k, state.prefix_v, state.context_k, state.context_v, own.append(k, v),
                     state.temperature, state.scaling, state.scale)
    return _step_output(state, q), state


def _step_output(state: APEState, q: torch.Tensor) -> torch.Tensor:
    """APE attention of ``q`` (the newest own tokens) over the state."""
    return _ape(q, state.prefix_k, state.prefix_v, state.context_k, state.context_v, state.own.keys,
                state.own.values, state.temperature, state.scaling, state.scale)[0]


def _ape(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, context_k: torch.Tensor,
    context_v: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor, temperature: float, scaling: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path: three parts, the contexts' log-sum-exp scaled by ``S·T``, merged exactly."""
    context_out, context_lse = part_attention(q, context_k, context_v, scale / temperature)
    return merge_parts([part_attention(q, prefix_k, prefix_v, scale),
                        (context_out, scaling * temperature * context_lse),
                        part_attention(q, own_k, own_v, scale, causal=True)])


def _scale(scale: float | None, d: int) -> float:
    """``scale``, default ``d ** -0.5``; a given one must be a positive finite number."""
    if scale is None:
        return d ** -0.5
    _check_factor("scale", scale)
    return float(scale)


def _check_factor(name: str, x: object) -> None:
    """A positive finite real number (not a bool, not a tensor)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise fail(name, "a positive finite number", repr(x))


def _check_kv(
    names: tuple[str, str], k: object, v: object, batch: int | None, hkv: int | None, d: int | None,
    dv: int | None, shared: bool = False,
) -> None:
    """``k`` (batch, hkv, n, d) and ``v`` (same, dv) where given (None: any); ``shared`` also allows batch 1."""
    for name, t in zip(names, (k, v), strict=True):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise fail(name, "a 4-d tensor (batch, kv_heads, seq, dim)", got)
    assert isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    batches = {batch, 1} if shared else {batch}
    want = f"({'1 or ' if shared else ''}{batch or 'B'}, {hkv or 'Hkv'}, n, {d or 'D'})"
    if (batch is not None and k.shape[0] not in batches) or (hkv is not None and k.shape[1] != hkv) or (
            d is not None and k.shape[-1] != d):
        raise fail(names[0], f"shape {want}", tuple(k.shape))
    if tuple(v.shape[:3]) != tuple(k.shape[:3]) or (dv is not None and v.shape[-1] != dv):
        raise fail(names[1], f"shape {(*k.shape[:3], dv or 'Dv')} (from {names[0]})", tuple(v.shape))


def _check_contexts(
    prefix_k: torch.Tensor, prefix_v: torch.Tensor, contexts_k: Sequence[torch.Tensor],
    contexts_v: Sequence[torch.Tensor], batch: int | None, d: int | None,
) -> None:
    """The prefix (batch and head dim ``d`` where given: the query's), and a non-empty list of contexts, each
    ``(B, Hkv, L_i ≥ 1, ·)`` with the prefix's heads and dims."""
    _check_kv(("prefix_k", "prefix_v"), prefix_k, prefix_v, batch, None, d, None, shared=True)
    for name, seq in (("contexts_k", contexts_k), ("contexts_v", contexts_v)):
        if not isinstance(seq, (list, tuple)) or not seq:
            got = f"an empty {type(seq).__name__}" if isinstance(seq, (list, tuple)) else type(seq).__name__
            raise fail(name, "a non-empty list of tensors (one per context)", got)
    if len(contexts_v) != len(contexts_k):
        raise fail("contexts_v", f"{len(contexts_k)} tensors (one per context, as contexts_k)", len(contexts_v))
    hkv, d, dv = prefix_k.shape[1], prefix_k.shape[-1], prefix_v.shape[-1]
    for i, (k, v) in enumerate(zip(contexts_k, contexts_v, strict=True)):
        _check_kv((f"contexts_k[{i}]", f"contexts_v[{i}]"), k, v, batch, hkv, d, dv)
        if k.shape[2] == 0:
            raise fail(f"contexts_k[{i}]", "at least one token", 0)
        batch = k.shape[0]  # without a given batch, the first context fixes it
    if prefix_k.shape[0] not in (1, batch):
        raise fail("prefix_k", f"batch 1 or {batch} (from the contexts)", prefix_k.shape[0])


def _check_context_queries(
    contexts_q: Sequence[torch.Tensor], contexts_k: Sequence[torch.Tensor], prefix_k: torch.Tensor,
) -> None:
    """One query tensor per context, ``(B, H, L_i, D)`` with ``H`` a multiple of the contexts' ``Hkv``."""
    if not isinstance(contexts_q, (list, tuple)) or len(contexts_q) != len(contexts_k):
        got = len(contexts_q) if isinstance(contexts_q, (list, tuple)) else type(contexts_q).__name__
        raise fail("contexts_q", f"a list of {len(contexts_k)} tensors (one per context)", got)
    b, hkv, d = contexts_k[0].shape[0], prefix_k.shape[1], prefix_k.shape[-1]
    heads = None
    for i, (q, k) in enumerate(zip(contexts_q, contexts_k, strict=True)):
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or tuple(q.shape) != (b, q.shape[1], k.shape[2], d) or (
                q.shape[1] % hkv or heads not in (None, q.shape[1])):
            got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise fail(f"contexts_q[{i}]", f"shape ({b}, H, {k.shape[2]}, {d}), H a multiple of {hkv}, the same H "
                       "for every context", got)
        heads = q.shape[1]


def _check_query(q: object) -> None:
    """``q``: a 4-d tensor."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise fail("q", "a 4-d tensor (batch, heads, seq, dim)", tuple(q.shape) if isinstance(q, torch.Tensor)
                   else type(q).__name__)


def _check_attention(
    q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, context_k: torch.Tensor,
    context_v: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
    own_names: tuple[str, str] = ("own_k", "own_v"),
) -> None:
    """Shapes of the query attention's arguments, each failure naming its argument."""
    _check_query(q)
    b, h, sq, d = q.shape
    _check_kv(("prefix_k", "prefix_v"), prefix_k, prefix_v, b, None, d, None, shared=True)
    hkv, dv = prefix_k.shape[1], prefix_v.shape[-1]
    if h % hkv:
        raise fail("prefix_k", f"a number of kv heads dividing {h} (from q)", hkv)
    _check_kv(("context_k", "context_v"), context_k, context_v, b, hkv, d, dv)
    if context_k.shape[2] == 0:
        raise fail("context_k", "at least one context token", 0)
    _check_kv(own_names, own_k, own_v, b, hkv, d, dv)
    if own_k.shape[2] < sq:
        raise fail(own_names[0], f"at least {sq} tokens (the queries are the last own tokens)", own_k.shape[2])
