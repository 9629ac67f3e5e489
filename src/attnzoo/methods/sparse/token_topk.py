"""D12 — token scoring and top-k: score the tokens, keep the top-k as keys (or as queries).

Papers: "Less is More: Focus Attention for Efficient DETR" (Focus-DETR, Zheng et al., arXiv:2307.12612); "HiPrune:
Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models" (Liu et al.,
arXiv:2508.00553); "ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language Tuning" (Hao et al.,
arXiv:2410.17779). Their shared core: a score per token, the ``keep`` best tokens, attention restricted to them.

Formula as implemented. Each token ``t`` of the scored side (the keys, or the queries) gets a score ``s_t`` (below);
the ``n = keep`` tokens of highest score per (batch, selection head) are kept (``keep``: a count, or a fraction of the
side's tokens, ``max(1, round(keep · S))``), and

- ``side="keys"``: every query attends only to the kept keys (the ones it may see: ``j ≤ i + Skv − Sq`` when causal),
  ``O_i = softmax_{j ∈ kept, visible(i, j)} (scale · q_i·k_j) V``. A token selection shared by all queries:
  HiPrune's and ADEM-VL's dropped visual tokens are dropped as keys.
- ``side="queries"``: the kept queries attend to every key they may see, the others give 0:
  ``O_i = softmax_{visible(i, j)} (scale · q_i·k_j) V`` for kept ``i``, else ``0``. Focus-DETR (and Sparse DETR
  before it) update only the selected foreground tokens in each encoder layer and pass the others through unchanged;
  an attention output of 0 is exactly that once the layer adds its residual (``x + 0``), and it keeps the output
  shape. (Focus-DETR's encoder attention is deformable over multi-scale maps; here it is plain attention.)

Scores (``score``), all computed from the inputs rounded to float32 (``s`` per head of the scored side):

- ``"attention"`` (default, training-free): the attention each token receives from the pooled other side —
  keys: ``s_j = softmax_j(scale · q̄·k_j)`` with ``q̄`` the mean query of the head; queries: ``s_i = softmax_i(scale
  · q_i·k̄)``. HiPrune keeps the tokens that receive the most attention (its anchors, from a middle encoder layer)
  and ADEM-VL drops the visual features of lowest attention score; the pooled query stands in for the attention of
  every query at O(N·d) cost instead of O(N²·d).
- ``"cls"``: the attention from the first token of the other side (a ViT's [CLS]; the CLS-attention rule HiPrune
  compares against).
- ``"norm"``: ``‖x_t‖`` (the L2 norm of the key, or query).
- ``"learned"``: ``s_t = x_t · w_h``, a linear scorer per head of the scored side, ``scorer (Hkv or H, D)`` owned by
  ``az.nn.Attention`` (init ``N(0, 1/D)``): Focus-DETR's foreground scorer, reduced to one linear map on the
  keys/queries. The top-k choice passes no gradient to it; train it with your own objective on
  :func:`token_scores` (Focus-DETR supervises its scorer with foreground labels).

Heads (``share``): ``"all"`` (default: one kept set per batch element, the heads' scores summed — the papers select
tokens, not per-head keys), ``"group"`` (one per KV head, summed over its query heads) or ``"head"`` (one per query
head). Ties are broken by ``torch.topk`` (deterministic for given inputs on a device). The selection reads all tokens
of both sides (the pooled query, say), also in a causal call: it is a selection over the whole sequence, and there is
no decoder.

Other choices: ADEM-VL ranks the visual features *per text token* (its drop ratio γ per row of the attention map):
that per-query rule is top-k attention (catalogue S7); here one ranking per (batch, selection head), ``keep = 1 − γ``.
HiPrune's buffer tokens (the spatial neighbours of its anchors) and register tokens (deep-layer attention) need the
image layout and other layers; they are not part of this function. No user mask or bias.

Reference (:func:`reference`): the kept set from :func:`select` on the same inputs, as a dense token mask AND causal,
then a dense masked softmax. Fast path ``torch`` (:func:`torch_gathered`): gather the kept tokens once (keys and
values, or queries) and run one fused SDPA call over them (GQA without copies when the selection is shared by a KV
group); causal calls run in row chunks with the position mask, each chunk over the prefix of keys its last row may
see. Time ``O(Sq·n·d)`` (keys) or ``O(n·Skv·d)`` (queries), memory ``O(N·d)`` plus one chunk's mask.

The output is one softmax over a set of the original keys per query (the kept keys; with ``side="queries"`` all
visible keys for a kept query, none for the others, whose ``-inf`` log-sum-exp goes with their 0 output), so the
method returns its log-sum-exp (``return_lse=True``): the torch path then runs
:func:`~attnzoo.kernels.dense.attention_lse` where it runs SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kernels.dense import attention_lse
from attnzoo.methods.common import Output, masked_attention, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Call, LayerInfo, MethodSpec, Param, TestHints, register

SIDES = ("keys", "queries")
SCORES = ("attention", "cls", "norm", "learned")
SHARES = ("all", "group", "head")
MASK_ELEMENTS = 1 << 23  # causal path: (query, key) mask elements per SDPA chunk


def _given(call: Call, name: str) -> Any:
    return call.params.get(name, DEFAULTS[name])


def _side_length(call: Call) -> int:
    return call.seq_kv if _given(call, "side") == "keys" else call.seq_q


def kept_count(keep: int | float, tokens: int) -> int:
    """How many of ``tokens`` tokens ``keep`` keeps: the count itself, or ``max(1, round(keep · tokens))``."""
    return keep if isinstance(keep, int) else max(1, round(keep * tokens))


def _check_keep(value: int | float, call: Call) -> str | None:
    tokens = _side_length(call)
    if isinstance(value, int) and value > tokens:
        return f"a count of at most {tokens} (the {_given(call, 'side')}) or a fraction in (0, 1]"
    if isinstance(value, float) and value > 1:
        return "a fraction in (0, 1] or a count"
    return None


def _scorer_heads(call_heads: int, kv_heads: int, side: str) -> int:
    return kv_heads if side == "keys" else call_heads


def _check_scorer(value: torch.Tensor, call: Call) -> str | None:
    shape = (_scorer_heads(call.heads, call.kv_heads, _given(call, "side")), call.head_dim)
    if tuple(value.shape) != shape or not value.is_floating_point():
        return f"a float tensor of shape {shape} (heads of the scored side, head_dim)"
    return None


def _init_scorer(info: LayerInfo) -> torch.Tensor:
    heads = _scorer_heads(info.heads, info.kv_heads, info.params.get("side", DEFAULTS["side"]))
    return torch.randn(heads, info.head_dim) / info.head_dim**0.5


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    def pick(options: tuple[Any, ...]) -> Any:
        return options[int(torch.randint(0, len(options), (), generator=generator))]

    side, score = pick(SIDES), pick(SCORES)
    tokens = call.seq_kv if side == "keys" else call.seq_q
    keep = pick((0.3, 0.6, 1.0, 1, tokens, max(1, tokens // 2)))
    params: dict[str, Any] = {"side": side, "score": score, "keep": keep, "share": pick(SHARES)}
    if score == "learned":
        heads = _scorer_heads(call.heads, call.kv_heads, side)
        params["scorer"] = torch.randn(heads, call.head_dim, generator=generator, dtype=call.dtype).to(call.device)
    return params


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """Keys kept: ``fraction`` of them (a query then sees about that fraction of the keys it may see, causal or not:
    the kept set is spread over the sequence)."""
    return {"side": "keys", "keep": float(fraction)}


SPEC = MethodSpec(
    name="token_topk",
    family="sparse",
    mechanism="D12",
    paper="Less is More: Focus Attention for Efficient DETR; HiPrune; ADEM-VL (token scoring and top-k)",
    arxiv="2307.12612",
    summary="score tokens (attention from the pooled query, [CLS], norm, or a learned scorer), keep the top-k as the "
            "only keys, or as the only queries that attend (the others give 0)",
    exact=False,
    patterns=ALL_PATTERNS,
    params=(
        Param("keep", (int, float), 0.3, "tokens kept: a count, or a fraction of the scored side's tokens "
              "(Focus-DETR keeps 30%)", low=0, low_open=True, check=_check_keep),
        Param("side", (str,), "keys", "keep the top tokens as keys (every query sees only them) or as queries "
              "(only they attend; the others give 0)", choices=SIDES),
        Param("score", (str,), "attention", "token score: attention from the pooled other side, from its first "
              "token ([CLS]), the vector norm, or the learned scorer", choices=SCORES),
        Param("scorer", (torch.Tensor,), None, "(Hkv for keys or H for queries, D) linear scorer weights for "
              "score='learned' (learnable)", check=_check_scorer, init=_init_scorer),
        Param("share", (str,), "all", "one kept set per batch element, per KV group or per query head",
              choices=SHARES),
    ),
    complexity="O(Sq·n·d) (keys) or O(n·Skv·d) (queries) time for n kept tokens, plus O(N·d) scoring; O(N·d) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
    lse=True,
)
DEFAULTS: dict[str, Any] = {p.name: p.default for p in SPEC.params}


def token_scores(q: torch.Tensor, k: torch.Tensor, *, side: str = "keys", score: str = "attention",
                 scorer: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The score of every token of ``side`` per head of that side: ``(B, Hkv, Skv)`` for the keys, ``(B, H, Sq)`` for
    the queries (``"attention"`` and ``"cls"`` on the keys: ``(B, H, Skv)``, one row per query head). Differentiable
    in ``scorer`` for ``score="learned"``; ``scale`` defaults to ``1/√D``."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    own, other = (k, q) if side == "keys" else (q, k)
    if score == "norm":
        return own.float().norm(dim=-1)
    if score == "learned":
        if scorer is None:
            raise fail("scorer", f"a ({own.shape[1]}, {d}) tensor for score='learned'", "None")
        return torch.einsum("bhsd,hd->bhs", own.float(), scorer.float())
    pooled = other.float().mean(dim=2, keepdim=True) if score == "attention" else other[:, :, :1].float()
    if side == "keys":  # (B, H, 1, D) pooled queries against the keys of their KV head
        logits = pooled.view(b, hkv, h // hkv, 1, d) @ k.float().unsqueeze(2).transpose(-1, -2)
        return torch.softmax(scale * logits.view(b, h, -1), dim=-1)
    pooled = pooled.repeat_interleave(h // hkv, dim=1)  # (B, H, 1, D) pooled keys of each query head
    return torch.softmax(scale * (q.float() @ pooled.transpose(-1, -2)).squeeze(-1), dim=-1)


def _pool_heads(scores: torch.Tensor, heads: int) -> torch.Tensor:
    """Scores ``(B, Hx, S)`` summed (``heads < Hx``) or repeated (``heads > Hx``) to ``heads`` rows."""
    b, hx, s = scores.shape
    if heads < hx:
        return scores.view(b, heads, hx // heads, s).sum(dim=2)
    return scores.repeat_interleave(heads // hx, dim=1)


def select(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, **params: Any) -> torch.Tensor:
    """The kept token positions, ``(B, Hs, n)`` int64 ascending (``Hs`` = 1, Hkv or H for ``share``; ``n`` from
    ``keep``), of the keys or queries (``side``) of ``q (B, H, Sq, D)``, ``k (B, Hkv, Skv, D)``. ``params``: those of
    :data:`SPEC`, their defaults where not given; ``scale`` (of the attention scores) defaults to ``1/√D``."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise fail(sorted(unknown)[0], f"a parameter of token_topk ({', '.join(DEFAULTS)})", "an unknown name")
    p = {**DEFAULTS, **params}
    keep, side, score, share = p["keep"], p["side"], p["score"], p["share"]
    for name, value, options in (("side", side, SIDES), ("score", score, SCORES), ("share", share, SHARES)):
        if value not in options:
            raise fail(name, f"one of {list(options)}", repr(value))
    h, hkv = q.shape[1], k.shape[1]
    tokens = k.shape[2] if side == "keys" else q.shape[2]
    n = kept_count(keep, tokens)
    if not 1 <= n <= tokens:
        raise fail("keep", f"between 1 and {tokens} tokens", repr(keep))
    with torch.no_grad():
        scores = token_scores(q.detach(), k.detach(), side=side, score=score, scorer=p["scorer"], scale=scale)
    heads = {"all": 1, "group": hkv, "head": h}[share]
    return _pool_heads(scores, heads).topk(n, dim=-1).indices.sort(dim=-1).values


def _kept_mask(kept: torch.Tensor, heads: int, tokens: int) -> torch.Tensor:
    """``(B, heads, tokens)`` bool: True at the kept positions (query head ``h`` reads selection head ``h // (H /
    Hs)``)."""
    b, hs, _ = kept.shape
    out = torch.zeros(b, hs, tokens, dtype=torch.bool, device=kept.device).scatter_(2, kept, True)
    return out.repeat_interleave(heads // hs, dim=1)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, return_lse: bool = False, **params: Any,
) -> Output:
    kept, side = select(q, k, scale=scale, **params), params["side"]
    h, sq, skv = q.shape[1], q.shape[2], k.shape[2]
    # kept keys: (B, H, 1, Skv); kept queries: (B, H, Sq, 1)
    seen = _kept_mask(kept, h, skv).unsqueeze(2) if side == "keys" else _kept_mask(kept, h, sq).unsqueeze(3)
    return masked_attention(q, k, v, seen & visible(causal, None, q, k), scale, None, None, return_lse)


def _gather(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Rows ``kept (B, Hs, n)`` of ``x (B, Hx, S, F)`` per head: ``(B, max(Hs, Hx), n, F)`` (a selection shared by
    several heads of ``x`` is read for each; a head of ``x`` shared by several selection heads is read by each,
    without copying ``x``)."""
    b, hx, s, f = x.shape
    hs, n = kept.shape[1], kept.shape[2]
    heads = max(hs, hx)
    source = x.unsqueeze(2).expand(b, hx, heads // hx, s, f).reshape(b, heads, s, f) if hs > hx else x
    index = kept.repeat_interleave(heads // hs, dim=1) if hs < heads else kept
    return source.gather(2, index.unsqueeze(-1).expand(b, heads, n, f))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_pos: torch.Tensor | None,
            k_pos: torch.Tensor | None, offset: int, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA of ``q (B, H, R, D)`` over ``k, v (B, Hk, T, ·)``; when positions are given (``(B, 1|H|Hk, R|T)``
    ascending, or None for ``arange``), query ``i`` sees key ``j`` iff ``k_pos_j ≤ q_pos_i + offset``, in row chunks
    over the prefix of keys each chunk's last row may see; rows that see no key give 0. Returns the output and, with
    ``return_lse``, the rows' log-sum-exp (``-inf`` for a row that sees no key; the calls are then
    :func:`~attnzoo.kernels.dense.attention_lse`, as SDPA returns none), else None."""
    gqa = q.shape[1] != k.shape[1]
    if q_pos is None and k_pos is None:
        if return_lse:
            return attention_lse(q, k, v, causal=False, scale=scale, mask=None, bias=None)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa), None
    b, h, r, _ = q.shape
    t = k.shape[2]
    q_pos = torch.arange(r, device=q.device).expand(b, 1, r) if q_pos is None else q_pos
    k_pos = torch.arange(t, device=q.device).expand(b, 1, t) if k_pos is None else k_pos
    k_pos = k_pos.repeat_interleave(h // k_pos.shape[1], dim=1) if 1 < k_pos.shape[1] < h else k_pos
    q_pos = q_pos.repeat_interleave(h // q_pos.shape[1], dim=1) if 1 < q_pos.shape[1] < h else q_pos
    rows = max(1, MASK_ELEMENTS // max(1, b * h * t))
    out, lses = [], []
    for start in range(0, r, rows):
        qp = q_pos[:, :, start:start + rows] + offset  # (B, 1|H, rows)
        reach = int((k_pos <= qp.amax(dim=-1, keepdim=True)).sum(dim=-1).max())  # keys ascending: a prefix
        seen = k_pos[:, :, None, :reach] <= qp[..., None]  # (B, 1|H, rows, reach)
        chunk = q[:, :, start:start + rows]
        if reach == 0:
            out.append(chunk.new_zeros(*chunk.shape[:3], v.shape[-1]))
            lses.append(chunk.new_full(chunk.shape[:3], float("-inf")))
        elif return_lse:
            o, lse = attention_lse(chunk, k[:, :, :reach], v[:, :, :reach], causal=False, scale=scale, mask=seen,
                                   bias=None)
            out.append(o)
            lses.append(lse)
        else:
            some = seen.any(dim=-1, keepdim=True)
            o = F.scaled_dot_product_attention(chunk, k[:, :, :reach], v[:, :, :reach], attn_mask=seen | ~some,
                                               scale=scale, enable_gqa=gqa)
            out.append(o * some.to(o.dtype))
    return torch.cat(out, dim=2), torch.cat(lses, dim=2) if return_lse else None


def torch_gathered(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, return_lse: bool = False, **params: Any,
) -> Output:
    kept, side = select(q, k, scale=scale, **params), params["side"]
    offset = k.shape[2] - q.shape[2]
    if side == "keys":
        kg, vg = _gather(k, kept), _gather(v, kept)
        out, lse = _attend(q, kg, vg, scale, None, kept if causal else None, offset, return_lse)
        return out if lse is None else (out, lse)
    b, h, sq, _ = q.shape
    rows, rows_lse = _attend(_gather(q, kept), k, v, scale, kept if causal else None, None, offset, return_lse)
    index = kept.repeat_interleave(h // kept.shape[1], dim=1)
    out = rows.new_zeros(b, h, sq, v.shape[-1]).scatter(2, index.unsqueeze(-1).expand(*rows.shape), rows)
    if rows_lse is None:
        return out
    return out, rows_lse.new_full((b, h, sq), float("-inf")).scatter(2, index, rows_lse)


register(SPEC, reference, [Backend("torch", torch_gathered, lse=True)])
