"""D7 — HiP: hierarchically pruned attention, a tree search for each query block's top-k key blocks.

Paper: "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning" (Lee et al.,
arXiv:2406.09827; later versions "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework with
Hierarchically Pruned Attention"); code github.com/DeepAuto-AI/hip-attention (the readable form of the search is
``masking_iteration_draft`` of its v1.1 draft, ``hip_attn_legacy/v1_1/attention2_draft.py``).

Formula as implemented. Queries are cut into blocks of ``block_q``, keys into blocks of ``block_k`` (the last of each
may be partial). For query block ``a`` the key blocks it may see are ``[0, E_a)``: every block when noncausal, else
the blocks whose first key is visible to its last query (bottom-right aligned, as attnzoo's causal mask). They are
tiled into three parts:

- the *sink*: blocks ``[0, ⌈sink / block_k⌉)`` (the first tokens, always attended, as HiP's ``sink_token_size``);
- the *window* (causal calls only): the last ``⌈window / block_k⌉`` visible blocks, the query block's own diagonal
  block among them (HiP's ``sliding_window_size``, at block granularity: every query of the block sees those blocks,
  with the token-level causal mask inside them);
- between them, the search range ``[lo, hi)``, pruned by the tree search to at most ``top_k`` blocks.

The search (HiP's hierarchical top-k estimation): the range of ``R = hi − lo`` blocks is cut into ``top_k`` branches
(branch ``i`` starts at block ``lo + ⌊R·i / top_k⌋``; empty branches when ``R < top_k``). Each iteration splits every
kept branch of ``s`` blocks into two children of ``⌊s/2⌋`` and ``⌈s/2⌉`` blocks, scores each non-empty child by its
*representative* key ``r``: ``score = max_{i in the query block} q_i · k_r`` (unscaled, float32), and keeps the
``top_k`` best children (``torch.topk``; ties broken by its order, deterministic on a device). Iterations stop when
every branch is one block (⌈log₂⌈R / top_k⌉⌉ of them); the branches left are the selected blocks. When ``R ≤ top_k``
the whole range is selected (HiP attends to every key when the context is shorter than its budget); ``top_k`` larger
than the number of blocks is therefore not an error. Each query then attends with one softmax to the keys of its
selected blocks (sink ∪ search ∪ window), with the token-level causal mask::

    O_i = softmax_{j ∈ S(a), j visible to i}(scale · q_i·k_j) V,   S(a) = sink ∪ tree_top_k([lo, hi)) ∪ window

Representative (``representative``): ``"first"``, the child's first key (the v1.1 draft's ``sample_method="first"``)
or ``"center"``, the key in the middle of the child's visible keys (the later ``sample_method="center"``). Choices:
the draft scores the child's first *key block* (``block_size_k`` keys; with its ``block_size_k=1`` default, one key)
with every other query of the block (``q[1::2]``); here one representative key is scored against every query of the
block, so the search costs ``O(N·top_k·d)`` per level whatever ``block_k`` is (with ``"first"`` a first child's
representative is its parent's, whose score is kept: ``top_k`` new scores per level). Branch boundaries are exact
integer divisions (the draft rounds ``BSRC / mask_block_k · i`` in floating point). The selection is per query head
(GQA: a head scores the keys of its group's KV head).

Defaults: ``block_q=32, block_k=2, top_k=256`` (the paper's budget of k = 512 keys in blocks of 2 per 32-query
block), ``sink=4, window=128`` (the public ``hip_attention``'s ``sink_token_size`` and ``sliding_window_size``),
``representative="first"``. For speed on CPU, larger blocks (64 keys) make the attend step efficient.

:func:`select` returns the selection as a :class:`~attnzoo.kernels.selection.BlockSelection` (key blocks of
``block_k``, one row per query block and head). Reference (:func:`reference`): that selection as a dense token mask,
AND causal, then a dense masked softmax. Fast path ``torch`` (:func:`torch_tree`): :func:`select`, then
:func:`attnzoo.kernels.block_sparse.selected_attention`; ``flex`` (:func:`flex_tree`): FlexAttention with
``selection.block_mask``. Time ``O(N·top_k·d·log(N / top_k) + N·(top_k + sink + window)·block_k·d)``; the search is
vectorised over (batch, head, query block), run over bounded chunks of query blocks, one loop step per tree level.
The output is one softmax over the keys of the found blocks, so the method returns its log-sum-exp
(``return_lse=True``, from the reference and ``torch``).

Decoding (:data:`DECODER`): :func:`decode_prefill` runs the causal forward with blocks of ``block_q`` and keeps a
:class:`~attnzoo.kv.cache.KVCache`; :func:`decode_step` searches for each new query alone (a query block of one) over
the cached keys by position and attends over the slots of its blocks. It equals the causal forward with
``block_q=1``; with larger query blocks the forward's choice for a block also depends on its later queries, which a
decoded token cannot see.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.kernels import flex
from attnzoo.kernels.block_sparse import selected_attention
from attnzoo.kernels.selection import BlockSelection
from attnzoo.kv.attend import selected_slots, softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.masks.core import causal as causal_mod
from attnzoo.methods.common import Output, masked_attention, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register

# Query blocks scored at once by the search: bounds its gathered representative keys and scores.
SEARCH_ELEMENTS = 1 << 22


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=generator))

    return {"block_q": draw(1, 6), "block_k": draw(1, 5), "top_k": draw(1, 4), "sink": draw(0, 3),
            "window": draw(0, 6), "representative": ("first", "center")[draw(0, 1)]}


def _decoding_params(call: Call, params: dict[str, Any], prompt: int) -> dict[str, Any]:
    return {"block_q": 1}  # a decoded token is a query block of its own


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """Blocks of up to 64 keys (at least 64 blocks), the window one block when causal, no sink; ``top_k`` the rest of
    ``fraction`` of the blocks a query sees on average (half of them when causal)."""
    block = max(1, min(64, call.seq_kv // 64))
    blocks = -(-call.seq_kv // block)
    seen = (blocks + 1) / 2 if call.causal else blocks
    window = block if call.causal else 0
    return {"block_q": block, "block_k": block, "sink": 0, "window": window, "representative": "first",
            "top_k": max(1, round(fraction * seen) - (1 if call.causal else 0))}


SPEC = MethodSpec(
    name="hip",
    family="sparse",
    mechanism="D7",
    paper="HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
    arxiv="2406.09827",
    summary="per query block, a tree search (halve branches, score a representative key, keep the top-k) for its "
            "top-k key blocks, plus sink and local window blocks",
    exact=False,
    patterns=ALL_PATTERNS,
    params=(
        Param("block_q", (int,), 32, "queries per query block (the search runs once per block)", low=1),
        Param("block_k", (int,), 2, "keys per key block (the leaves of the search)", low=1),
        Param("top_k", (int,), 256, "key blocks the search keeps per query block (all of its range if fewer)",
              low=1),
        Param("sink", (int,), 4, "first keys always attended (rounded up to whole key blocks)", low=0),
        Param("window", (int,), 128, "latest keys always attended, causal calls (rounded up to whole key blocks)",
              low=0),
        Param("representative", (str,), "first", "the key that scores a branch: its first or its center key",
              choices=("first", "center")),
    ),
    complexity="O(N·top_k·d·log(N/top_k)) search + O(N·(top_k·block_k + sink + window)·d) attention; O(N) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample, decoding_params=_decoding_params),
    at_density=at_density,
    lse=True,
)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _levels(span: int, top_k: int) -> int:
    """The iterations after which a range of ``span`` blocks cut into ``top_k`` branches has one-block branches."""
    size, levels = _cdiv(max(span, 0), top_k), 0
    while size > 1:
        size, levels = _cdiv(size, 2), levels + 1
    return levels


def tree_search(q_rows: torch.Tensor, keys: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, limit: torch.Tensor,
                *, top_k: int, block_k: int, representative: str) -> torch.Tensor:
    """HiP's hierarchical top-k search (module docstring) for every row at once.

    ``q_rows (B, H, R, T, D)``: each row's queries (a query block; pad a short block by repeating one of its
    queries, which leaves the max unchanged); ``keys (B, Hkv, L, D)``: keys by position; ``lo``, ``hi``: each row's
    search range in key blocks, ``limit``: its first invisible key position, all broadcastable to ``(B, H, R)``.
    Returns ``(B, H, R, top_k)`` int64: the selected key blocks, ``-1`` in unused slots. Scores are float32; the
    search runs with ``min(top_k, widest range)`` branches (a range that fits is kept whole either way).
    """
    b, h, rows, _, d = q_rows.shape
    hkv = keys.shape[1]
    g = h // hkv
    lo, hi, limit = (torch.broadcast_to(t, (b, h, rows)).long() for t in (lo, hi, limit))
    span = (hi - lo).clamp(min=0)
    widest = int(span.max()) if span.numel() else 0
    width, top_k = top_k, min(top_k, max(1, widest))  # ranges that fit in top_k branches are kept whole anyway
    branch = torch.arange(top_k + 1, device=keys.device)
    edges = lo.unsqueeze(-1) + span.unsqueeze(-1) * branch // top_k  # (B, H, R, top_k + 1)
    starts, sizes = edges[..., :-1], edges[..., 1:] - edges[..., :-1]
    queries = q_rows.float()
    flat = keys.float().reshape(-1, d)  # (B·Hkv·L, D): a representative is one row
    base = ((torch.arange(b, device=keys.device).view(b, 1) * hkv
             + torch.arange(h, device=keys.device) // g) * keys.shape[2]).view(b, h, 1, 1)

    def scores(rep: torch.Tensor) -> torch.Tensor:
        """``max_i q_i · k_rep`` over each row's queries, ``rep (B, H, R, n)`` key positions."""
        rows_of = flat.index_select(0, (rep.clamp(0, keys.shape[2] - 1) + base).flatten())
        return (queries @ rows_of.view(*rep.shape, d).transpose(-1, -2)).amax(dim=-2)

    levels = _levels(widest, top_k)
    # "first": a first child's representative is its parent's, so only the second children are scored per level
    score = scores(starts * block_k) if representative == "first" and levels else None
    for _ in range(levels):
        half = sizes // 2
        second = starts + half
        if score is not None:
            score = torch.cat([score, scores(second * block_k)], dim=-1)
        starts = torch.cat([starts, second], dim=-1)  # (B, H, R, 2·top_k): first children, then second
        sizes = torch.cat([half, sizes - half], dim=-1)
        if representative == "center":
            first = starts * block_k
            end = torch.minimum((starts + sizes) * block_k, limit.unsqueeze(-1))
            score = scores(first + (end - first).clamp(min=1) // 2)
        assert score is not None
        best = score.masked_fill(sizes < 1, float("-inf")).topk(top_k, dim=-1).indices
        starts, sizes, score = starts.gather(-1, best), sizes.gather(-1, best), score.gather(-1, best)
    return F.pad(torch.where(sizes >= 1, starts, -1), (0, width - top_k), value=-1)


def _row_limits(*, causal: bool, seq_q: int, seq_kv: int, block_q: int, block_k: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: the number of key blocks it may see ``E_a`` and its first invisible key position."""
    nq, nk = _cdiv(seq_q, block_q), _cdiv(seq_kv, block_k)
    if not causal:
        return torch.full((nq,), nk, device=device), torch.full((nq,), seq_kv, device=device)
    last = (torch.arange(1, nq + 1, device=device) * block_q).clamp(max=seq_q) - 1 + seq_kv - seq_q  # frontier
    seen = torch.where(last >= 0, last.div(block_k, rounding_mode="floor") + 1, 0).clamp(max=nk)
    return seen, (last + 1).clamp(0, seq_kv)


def _parts(seen: torch.Tensor, *, sink: int, window: int, block_k: int, causal: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The search range ``[lo, hi)`` of rows that see ``seen`` key blocks: after the sink, before the window."""
    lo = torch.clamp(torch.full_like(seen, _cdiv(sink, block_k)), max=seen)
    hi = torch.maximum(lo, seen - (_cdiv(window, block_k) if causal else 0))
    return lo, hi


def _with_fixed(chosen: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``chosen (B, H, R, top_k)`` with the sink blocks ``[0, lo)`` and window blocks ``[hi, seen)`` added, each row
    ascending with unused slots (``-1``) last."""
    extra = int((lo + seen - hi).max()) if seen.numel() else 0
    b, h, rows, _ = chosen.shape
    slot = torch.arange(extra, device=chosen.device)
    lo, hi, seen = (torch.broadcast_to(t, (b, h, rows)).unsqueeze(-1) for t in (lo, hi, seen))
    fixed = torch.where(slot < lo, slot, hi + slot - lo)
    fixed = torch.where(fixed < seen, fixed, -1)
    both = torch.cat([chosen, fixed], dim=-1)
    big = torch.iinfo(torch.int64).max
    ordered = torch.where(both < 0, big, both).sort(dim=-1).values
    return torch.where(ordered == big, -1, ordered)


def select(q: torch.Tensor, k: torch.Tensor, *, causal: bool, block_q: int, block_k: int, top_k: int, sink: int,
           window: int, representative: str) -> BlockSelection:
    """The key blocks each (batch, query head, query block) sees: sink ∪ tree search ∪ window (module docstring)."""
    b, h, sq, d = q.shape
    skv = k.shape[2]
    nq = _cdiv(sq, block_q)
    seen, limit = _row_limits(causal=causal, seq_q=sq, seq_kv=skv, block_q=block_q, block_k=block_k,
                              device=q.device)
    lo, hi = _parts(seen, sink=sink, window=window, block_k=block_k, causal=causal)
    # query blocks (B, H, nq, block_q, D); a short last block repeats its last query (the max is unchanged)
    rows = torch.arange(nq * block_q, device=q.device).clamp(max=sq - 1)
    q_rows = q.detach()[:, :, rows].view(b, h, nq, block_q, d)
    keys = k.detach()
    top_k = min(top_k, max(1, int((hi - lo).max()) if nq else 1))
    per_row = max(1, h * (block_q + 2 * top_k) * (d + 1) * b)
    step = max(1, SEARCH_ELEMENTS // per_row)
    chosen = torch.cat([
        tree_search(q_rows[:, :, s : s + step], keys, lo[s : s + step], hi[s : s + step], limit[s : s + step],
                    top_k=top_k, block_k=block_k, representative=representative)
        for s in range(0, nq, step)], dim=2)
    return BlockSelection(_with_fixed(chosen, lo, hi, seen), block_q, block_k, sq, skv)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_q: int, block_k: int, top_k: int, sink: int, window: int, representative: str,
    return_lse: bool = False,
) -> Output:
    sel = select(q, k, causal=causal, block_q=block_q, block_k=block_k, top_k=top_k, sink=sink, window=window,
                 representative=representative)
    return masked_attention(q, k, v, sel.dense(q.shape[1]) & visible(causal, None, q, k), scale, None, None,
                            return_lse)


def torch_tree(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_q: int, block_k: int, top_k: int, sink: int, window: int, representative: str,
    return_lse: bool = False,
) -> Output:
    sel = select(q, k, causal=causal, block_q=block_q, block_k=block_k, top_k=top_k, sink=sink, window=window,
                 representative=representative)
    return selected_attention(q, k, v, sel, scale=scale, causal=causal, return_lse=return_lse)


def flex_tree(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_q: int, block_k: int, top_k: int, sink: int, window: int, representative: str,
    return_lse: bool = False,
) -> Output:
    sel = select(q, k, causal=causal, block_q=block_q, block_k=block_k, top_k=top_k, sink=sink, window=window,
                 representative=representative)
    mod = causal_mod(q.shape[2], k.shape[2]) if causal else None
    return flex.attention(q, k, v, scale=scale, block_mask=sel.block_mask(q.shape[1], mask_mod=mod),
                          return_lse=return_lse)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, block_q: int, block_k: int, top_k: int,
    sink: int, window: int, representative: str, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal HiP over a (right-padded) prompt and the cache of its keys and values."""
    out = torch_tree(q, k, v, causal=True, scale=scale, mask=None, bias=None, block_q=block_q, block_k=block_k,
                     top_k=top_k, sink=sink, window=window, representative=representative)
    return out, KVCache.from_prompt(k, v, lengths)


def _keys_by_position(cache: KVCache) -> torch.Tensor:
    """``(B, Hkv, P, D)``: the cached key of each position ``< P`` (the longest sequence), 0 where none is cached."""
    b, hkv, _, d = cache.keys.shape
    p = int(cache.length.max())
    slot = torch.where(cache.positions >= 0, cache.positions.long(), p).unsqueeze(-1).expand(-1, -1, -1, d)
    out = torch.zeros(b, hkv, p + 1, d, dtype=cache.keys.dtype, device=cache.keys.device)
    return out.scatter(2, slot, cache.keys)[:, :, :p]


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, block_q: int, block_k: int,
    top_k: int, sink: int, window: int, representative: str,
) -> tuple[torch.Tensor, KVCache]:
    """``T`` tokens per sequence: append them, search each new query's blocks over the cache, attend over them."""
    cache = cache.append(k, v)
    pos = cache.query_positions(q.shape[2]).long()[:, :, :, 0]  # (B, 1, T)
    seen = pos.div(block_k, rounding_mode="floor") + 1
    lo, hi = _parts(seen, sink=sink, window=window, block_k=block_k, causal=True)
    chosen = tree_search(q.unsqueeze(3), _keys_by_position(cache), lo, hi, pos + 1, top_k=top_k, block_k=block_k,
                         representative=representative)
    chosen = _with_fixed(chosen, lo, hi, seen)
    return softmax_attention(cache, q, scale, selected_slots(cache, chosen, block_k)), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True, chunked=True)

register(SPEC, reference, [Backend("torch", torch_tree, lse=True),
                           Backend("flex", flex_tree, flex.unavailable_masked, lse=True)], DECODER)
