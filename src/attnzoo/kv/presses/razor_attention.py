"""K3 — RazorAttention: retrieval heads keep every token; the others keep sinks, a recent window and one compensation
token standing for what they dropped.

Paper: "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads" (Tang et al.; arXiv:2407.15891). Only
a few heads ("retrieval heads": *echo* heads, which attend to earlier copies of the current token, and *induction*
heads, which attend to the token that followed an earlier copy) read far-away content; the others look at the first
tokens and the recent ones, as StreamingLLM keeps.

As implemented, per sequence and kv head:

- a retrieval head keeps all its tokens;
- any other head keeps its ``n_sink`` first tokens (default 4) and its most recent ones, ``kept − 1`` tokens in all
  (``kept = tokens − floor(tokens · ratio)``, or ``budget``), plus one *compensation token*: the mean key
  ``k̄ = Σ c_j k_j / Σ c_j`` and mean value ``v̄`` of the ``n`` dropped tokens (``c_j``: the tokens each dropped slot
  already stands for, 1 for a plain one) with ``log_weight = log Σ c_j``. Attention then counts it ``Σ c_j`` times:
  ``softmax`` gives it ``Σ c_j · exp(q·k̄)``, which is the paper's compensation formula (the dropped tokens' weight
  estimated as ``n · exp(q·k̄)``, their output as ``v̄``). It takes the position of the last dropped token (every later
  query sees it). A row keeps exactly ``kept`` slots, the compensation token included.

Retrieval heads: ``retrieval_heads``, kv head indices (the same for every layer the press is used on; pass a press per
layer otherwise), or a boolean mask over the kv heads. When None they are detected from the prompt, the paper's
echo/induction scores read off the prompt itself (the paper measures them offline on repeated random tokens): two
prompt tokens are *the same token* when their values' cosine similarity is at least ``same_token`` (0.99; values
carry no position); a query's echo score is the attention it gives the earlier copies of its token, its induction
score the attention it gives the slots right after them; a head's scores are the means over the queries that have an
earlier copy and over its GQA group. The ``induction_fraction`` (0.15) of kv heads with the highest induction score and
the ``echo_fraction`` (0.01) with the highest echo score (rounded to whole heads; only heads with a positive score)
are retrieval heads, chosen per sequence. The attention is read over blocks of query rows, never the full matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import (
    PressContext,
    ScorerPress,
    check_fraction,
    check_integer,
    check_positive,
    kept_tokens,
    register_press,
    top_slots,
)
from attnzoo.kv.presses.observe import QUERY_BLOCK, attention_blocks, group_mean, kept_mask, slot_counts
from attnzoo.kv.presses.streaming_llm import sink_and_recent


@dataclass(frozen=True)
class RazorAttentionPress(ScorerPress):
    """Retrieval heads keep everything; other heads keep sinks + recent tokens + one compensation token."""

    n_sink: int = 4
    retrieval_heads: Sequence[int] | Sequence[bool] | None = None
    induction_fraction: float = 0.15
    echo_fraction: float = 0.01
    same_token: float = 0.99
    query_block: int = QUERY_BLOCK

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("n_sink", self.n_sink, 0)
        for name in ("induction_fraction", "echo_fraction", "same_token"):
            check_fraction(name, getattr(self, name))
        check_positive("query_block", self.query_block)
        if self.retrieval_heads is not None and (
                isinstance(self.retrieval_heads, (str, bytes)) or not isinstance(self.retrieval_heads, Sequence)):
            raise fail("retrieval_heads", "kv head indices or a boolean mask over the kv heads (or None)",
                       repr(self.retrieval_heads))
        if self.retrieval_heads is not None:  # a tuple: the press stays hashable and immutable
            object.__setattr__(self, "retrieval_heads", tuple(self.retrieval_heads))

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        """Sinks, then recency; a retrieval head's slots rank above every other head's (for wrappers that share a
        budget across heads; :meth:`compress` keeps them all)."""
        retrieval = self.retrieval(cache, context).unsqueeze(-1)
        scores = sink_and_recent(cache, self.n_sink)
        return torch.where(retrieval, scores + cache.length.view(-1, 1, 1) + self.n_sink + 1, scores)

    def retrieval(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        """``(B, Hkv)``: which rows belong to retrieval heads."""
        b, hkv = cache.positions.shape[:2]
        if self.retrieval_heads is None:
            return detect_retrieval_heads(cache, context, self.induction_fraction, self.echo_fraction,
                                          self.same_token, self.query_block)
        return head_mask(self.retrieval_heads, hkv, cache.keys.device).expand(b, hkv)

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        retrieval = self.retrieval(cache, context)
        tokens = cache.token_counts()
        kept = kept_tokens(cache, self.compression_ratio, self.budget)
        kept = torch.where(retrieval, tokens, kept)
        dropping = kept < tokens
        index = top_slots(sink_and_recent(cache, self.n_sink), cache, kept - dropping.long())
        return with_compensation(cache, index, dropping)


def head_mask(heads: Sequence[int] | Sequence[bool], kv_heads: int, device: torch.device) -> torch.Tensor:
    """``(1, Hkv)`` boolean mask of the retrieval heads given as indices or as a mask."""
    items = list(heads)
    if items and all(isinstance(h, bool) for h in items):
        if len(items) != kv_heads:
            raise fail("retrieval_heads", f"a mask of {kv_heads} booleans (one per kv head)", len(items))
        return torch.tensor(items, dtype=torch.bool, device=device).view(1, kv_heads)
    if any(isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < kv_heads for h in items):
        raise fail("retrieval_heads", f"kv head indices in [0, {kv_heads})", items)
    mask = torch.zeros(1, kv_heads, dtype=torch.bool, device=device)
    mask[0, items] = True
    return mask


def with_compensation(cache: KVCache, index: torch.Tensor, dropping: torch.Tensor) -> KVCache:
    """The cache of slots ``index`` plus, on rows where ``dropping``, one compensation slot: the count-weighted mean
    key and value of the dropped slots, ``log_weight = log(count)``, the last dropped token's position."""
    dropped = cache.occupied() & ~kept_mask(index, cache.slots)
    counts = slot_counts(cache) * dropped
    total = counts.sum(-1, keepdim=True)  # (B, Hkv, 1)
    share = (counts / total.clamp(min=1e-30)).unsqueeze(-1)
    mean_k = (share * cache.keys.float()).sum(2, keepdim=True).to(cache.keys.dtype)
    mean_v = (share * cache.values.float()).sum(2, keepdim=True).to(cache.values.dtype)
    last = cache.positions.masked_fill(~dropped, -1).argmax(-1, keepdim=True)  # the last dropped token's slot
    index = torch.cat([index, torch.where(dropping.unsqueeze(-1), last, -1)], -1)
    is_comp = torch.zeros_like(index, dtype=torch.bool)
    is_comp[..., -1] = dropping
    own = (torch.zeros_like(cache.positions, dtype=torch.float32) if cache.log_weight is None
           else cache.log_weight.float())
    log_weight = torch.where(is_comp, total.log(), own.gather(2, index.clamp(min=0).long()))
    out = cache.keep(index, log_weight=log_weight)
    keys = torch.where(is_comp.unsqueeze(-1), mean_k, out.keys)
    values = torch.where(is_comp.unsqueeze(-1), mean_v, out.values)
    return replace(out, keys=keys, values=values)


def detect_retrieval_heads(
    cache: KVCache, context: PressContext, induction_fraction: float, echo_fraction: float, same_token: float,
    block: int,
) -> torch.Tensor:
    """``(B, Hkv)``: retrieval heads found from the prompt's own echo and induction attention (see the module). Reads
    the prompt's cache, where slot ``i`` holds position ``i``."""
    b, hkv, _ = cache.positions.shape
    heads = context.queries.shape[1]
    unit_v = F.normalize(cache.values.float(), dim=-1)
    echo = torch.zeros(b, heads, device=cache.keys.device)
    induction = torch.zeros_like(echo)
    counted = torch.zeros(b, hkv, device=cache.keys.device)  # queries with an earlier copy of their token
    for _, weights, pos in attention_blocks(cache, context.queries, context.scale, block):
        rows = weights.shape[2]
        own = unit_v.gather(2, pos.view(b, 1, rows, 1).clamp(min=0).expand(b, hkv, rows, unit_v.shape[-1]))
        copies = (own @ unit_v.transpose(-1, -2) >= same_token) & cache.visible_to(pos - 1, hkv) & (pos >= 0)
        after = F.pad(copies[..., :-1], (1, 0))  # the slot right after each copy (at or before the query)
        echo += (weights * expand_heads(copies, heads)).sum((-1, -2))
        induction += (weights * expand_heads(after, heads)).sum((-1, -2))
        counted += copies.any(-1).sum(-1)
    per_query = expand_heads(counted, heads).clamp(min=1)
    echo_kv, induction_kv = group_mean(echo / per_query, hkv), group_mean(induction / per_query, hkv)
    return top_heads(induction_kv, induction_fraction) | top_heads(echo_kv, echo_fraction)


def expand_heads(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, Hkv, ...)`` → ``(B, H, ...)`` (each query head reads its kv head's row)."""
    b, hkv = mask.shape[:2]
    return mask.unsqueeze(2).expand(b, hkv, heads // hkv, *mask.shape[2:]).reshape(b, heads, *mask.shape[2:])


def top_heads(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(B, Hkv)``: the ``round(fraction · Hkv)`` best-scored heads of each sequence, among those scoring above 0."""
    count = round(fraction * scores.shape[1])
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if count:
        chosen.scatter_(1, scores.topk(count, dim=1).indices, True)
    return chosen & (scores > 0)


register_press(RazorAttentionPress, "K3", "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads",
               "2407.15891", "retrieval heads keep all; others keep sinks + recent + one compensation token",
               needs=("queries",))
