"""D9 — DHSA: dynamic hierarchical sparse attention over variable-length key chunks.

Paper: "Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs" (Xiong, Zou, Fekri, Cho,
arXiv:2510.24606); read with the authors' public code (github.com/xiongsiheng/DHSA: ``legacy/utils/helper.py``,
``_obtain_dhsa_mask`` and ``dhsa_sdpa``, the paper's variable-chunk prefill; its run scripts for the defaults).

Formula as implemented. The keys are cut into ``C`` variable-length *chunks* (boundaries below). Each chunk ``c``
with keys ``K_c`` (``|c|`` of them) and each query block ``a`` (``block_size`` queries ``Q_a``, the last one may be
partial) get a length-normalised representation and one chunk-level score::

    k̂_c = mean(K_c) · √|c|,   q̂_a = mean(Q_a) · √|a|,   S[a, c] = q̂_a · k̂_c

(the √size factor is the paper's "avgpool_norm": without it long chunks' means shrink towards the average key and
lose to short ones; on the query side it scales a whole row and does not change the ranking). The score is
*upsampled* to the keys — key ``j`` in chunk ``c`` scores ``S[a, c]`` — and query block ``a`` keeps the ``budget``
keys of highest upsampled score among those it may see, the ``sink`` first keys and the ``local`` most recent ones
always among them (counted in ``budget``; the paper's ``global_tokens`` and ``local_tokens``). Its queries then
attend with one exact softmax to the kept keys, with the token-level causal mask when causal::

    O_i = softmax_{j ∈ S(a(i)), visible(i, j)} (scale · q_i·k_j + bias_ij) V

Mapping onto :class:`~attnzoo.kernels.selection.BlockSelection` (the shared attend kernel's layout): selections are
made at a granularity of ``key_block`` keys and chunk boundaries fall on key-block edges, so a chunk is a run of
whole key blocks and its upsampled score is exactly the score of each of its blocks; the budget is then
``budget / key_block`` key blocks, chosen by :func:`~attnzoo.kernels.selection.topk_blocks` (future blocks excluded
when causal, ``always`` = sink and local blocks) for query blocks of ``block_size``. ``key_block = 1`` is the
paper's token-level rule exactly; a larger ``key_block`` is the same rule with boundaries snapped to its multiples
(the authors' later FlashAttention-based release selects fixed key blocks of 32–64 likewise). Ties — the keys of the
chunk that straddles the budget all score the same — are broken by ``torch.topk`` (deterministic for given inputs on
a device).

Boundaries (:func:`chunk_starts`). The paper predicts them with a small learned network (an encoder of the left and
right context of each position, a fusion of the two with their difference, product and similarity, an MLP), trained
on labels from shifts in the attention mass between the two sides of a position, and keeps the top-scoring ones after
1-D non-maximum suppression; the weights are model-specific. Training-free here, the same left/right construction
with the cosine similarity as the score: at each key-block edge ``p`` (token position), ``drop(p) = 1 − cos(ΣK[p −
window, p), ΣK[p, p + window))`` over the keys of every KV head concatenated (the predictor's input), i.e. how much
the keys change across ``p``; edges that are not the largest drop within ``2·window`` tokens are suppressed (the
paper's NMS window 8 for its boundary window 4) and the ``⌈Skv / chunk_size⌉ − 1`` largest remaining drops start a
chunk (fewer when fewer survive). Users with their own boundaries (the paper's predictor, sentence or document
ends) pass ``boundaries``: a bool ``(B or 1, Skv)`` tensor, True at a key that starts a chunk (key 0 always does),
only on multiples of ``key_block``.

Heads (``share``): ``"all"`` (default, the paper's code: Q and K averaged over heads, one selection for every head),
``"group"`` (one per KV head, queries averaged over its group: the gather happens once per group) or ``"head"`` (one
per query head). Selections are computed from the inputs rounded to float32, without gradients.

Defaults (the authors' LongBench scripts: query blocks of 128, a budget of 2048 keys, 128 global and 128 local tokens,
``num_chunks = 8·L / block_size``, i.e. chunks of 16 keys on average, boundary window 4): ``block_size=128,
budget=2048, sink=128, local=128, chunk_size=16, window=4``, with ``key_block=1`` (token-level, as the paper).

Causality: a query only ever sees keys at or before it, but *which* keys a query block keeps depends on all of its
queries and on whole chunks (their means, and boundaries, read up to ``window`` keys past an edge) — the paper's
prefill rule. A decoded token sees neither, so DHSA has no decoder (the paper's code decodes densely).

Reference (:func:`reference`): the selection from :func:`select`, expanded to a dense mask AND causal AND the user
mask, then a dense masked softmax. Fast path ``torch`` (:func:`torch_selected`): :func:`select`, then
:func:`attnzoo.kernels.block_sparse.selected_attention` (causal with ``key_block > 1`` dividing ``block_size``: over
:func:`causal_rows`, the same attention in query blocks of ``key_block``, whose diagonal blocks the kernel masks with
one shared triangle instead of per-row logits). Time ``O(N·budget·d)`` for the attention plus ``O(N·d·H +
N²/(block_size·key_block))`` for the scores, memory ``O(N·d + N²/(block_size·key_block))``. The output is one
softmax over the keys of the selected blocks, so the method returns its log-sum-exp (``return_lse=True``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kernels.block_sparse import selected_attention
from attnzoo.kernels.selection import BlockSelection, block_means, keys_at_density, topk_blocks
from attnzoo.methods.common import Output, masked_attention, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Call, MethodSpec, Param, TestHints, register

SHARES = ("all", "group", "head")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _given(call: Call, name: str) -> Any:
    return call.params.get(name, DEFAULTS[name])


def _check_budget(value: int, call: Call) -> str | None:
    key_block = _given(call, "key_block")
    most = _cdiv(call.seq_kv, key_block) * key_block
    if value % key_block or value > most:
        return f"a multiple of key_block {key_block} of at most {most} (the keys, in whole key blocks)"
    return None


def _check_boundaries(value: torch.Tensor, call: Call) -> str | None:
    key_block = _given(call, "key_block")
    shape = f"a bool tensor of shape ({call.batch} or 1, {call.seq_kv})"
    if value.dtype != torch.bool or value.dim() != 2 or value.shape[0] not in (1, call.batch) or (
            value.shape[1] != call.seq_kv):
        return shape
    off_edge = torch.arange(call.seq_kv, device=value.device) % key_block != 0
    if bool((value & off_edge).any()):
        return f"{shape} True only at multiples of key_block {key_block}"
    return None


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    """Tiny blocks for test shapes; a budget between one key block and all of them; sometimes user boundaries."""
    def pick(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=generator))

    key_block = pick(1, 3)
    nk = _cdiv(call.seq_kv, key_block)
    params: dict[str, Any] = {
        "block_size": pick(1, 8), "key_block": key_block, "budget": key_block * pick(1, nk),
        "sink": pick(0, 3), "local": pick(0, 4), "chunk_size": pick(1, 8), "window": pick(1, 3),
        "share": SHARES[pick(0, 2)],
    }
    if pick(0, 1):
        starts = torch.rand(call.batch, call.seq_kv, generator=generator) < 0.3
        params["boundaries"] = (starts & (torch.arange(call.seq_kv) % key_block == 0)).to(call.device)
    return params


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """The budget that reads about ``fraction`` of the keys each query may see (token-level keys), with sink and local
    windows of a sixteenth of the budget each (the paper's 128 + 128 of 2048); query blocks of 128 (the paper's) and
    chunks of 16 keys on average, smaller on short sequences (at least 16 of each)."""
    budget = keys_at_density(fraction, causal=call.causal, seq_q=call.seq_q, seq_kv=call.seq_kv)
    return {"key_block": 1, "budget": budget, "sink": budget // 16, "local": budget // 16,
            "block_size": max(1, min(128, call.seq_q // 16)), "chunk_size": max(1, min(16, call.seq_kv // 16))}


SPEC = MethodSpec(
    name="dhsa",
    family="sparse",
    mechanism="D9",
    paper="Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs",
    arxiv="2510.24606",
    summary="keys cut into variable chunks at key-similarity drops; chunk score mean(Q_block)·mean(K_chunk)·√sizes, "
            "upsampled to keys; each query block keeps its top-budget keys (sink and local always)",
    exact=False,
    patterns=ALL_PATTERNS,
    params=(
        Param("block_size", (int,), 128, "queries per query block (one selection per block)", low=1),
        Param("key_block", (int,), 1, "keys per selection unit; chunk boundaries fall on its multiples (1: "
              "token-level, as the paper)", low=1),
        Param("budget", (int,), 2048, "keys each query block keeps, sink and local included (a multiple of "
              "key_block, at most the keys)", low=1, check=_check_budget),
        Param("sink", (int,), 128, "first keys always kept (rounded up to whole key blocks)", low=0),
        Param("local", (int,), 128, "most recent keys (up to the block's last query) always kept (rounded up to "
              "whole key blocks)", low=0),
        Param("chunk_size", (int,), 16, "average chunk length: ⌈Skv / chunk_size⌉ chunks (heuristic boundaries)",
              low=1),
        Param("window", (int,), 4, "keys on each side of an edge compared by the boundary rule; drops within "
              "2·window keys of a larger one are suppressed", low=1),
        Param("boundaries", (torch.Tensor,), None, "(B or 1, Skv) bool, True at a key that starts a chunk (on "
              "multiples of key_block); None: the key-similarity rule", check=_check_boundaries),
        Param("share", (str,), "all", "one selection for all heads, per KV group or per query head",
              choices=SHARES),
    ),
    complexity="O(N·budget·d + N·d·H + N²/(block_size·key_block)) time, O(N·d + N²/(block_size·key_block)) memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
    lse=True,
)
DEFAULTS: dict[str, Any] = {p.name: p.default for p in SPEC.params}


def edge_drops(k: torch.Tensor, *, window: int, key_block: int) -> torch.Tensor:
    """``(B, Nk)``: at each key-block edge ``p = e·key_block``, ``1 − cos`` between the sums of the ``window`` keys
    before and after it (every KV head's key concatenated; windows cut at the sequence ends); ``−inf`` at edge 0,
    which always starts a chunk. ``O(N·Hkv·D·window)`` time."""
    b, hkv, skv, d = k.shape
    x = F.pad(k.detach().float().permute(0, 2, 1, 3).reshape(b, skv, hkv * d), (0, 0, window, window))
    sums = x[:, : skv + window + 1].clone()  # sums[:, s] = Σ keys [s − window, s) (zeros outside the sequence)
    for shift in range(1, window):
        sums += x[:, shift: shift + skv + window + 1]
    edge = torch.arange(0, skv, key_block, device=k.device)
    drops = 1 - F.cosine_similarity(sums[:, edge], sums[:, edge + window], dim=-1, eps=1e-12)
    drops[:, 0] = float("-inf")
    return drops


def chunk_starts(k: torch.Tensor, *, chunk_size: int, window: int, key_block: int) -> torch.Tensor:
    """``(B, Nk)`` bool, True at a key block that starts a chunk: block 0, and the ``⌈Skv / chunk_size⌉ − 1`` largest
    :func:`edge_drops` that are the largest within ``2·window`` keys (fewer when fewer remain)."""
    drops = edge_drops(k, window=window, key_block=key_block)
    nk = drops.shape[1]
    radius = _cdiv(2 * window, key_block)
    peak = F.max_pool1d(drops.unsqueeze(1), 2 * radius + 1, stride=1, padding=radius).squeeze(1)
    candidates = drops.masked_fill(drops < peak, float("-inf"))
    wanted = min(_cdiv(k.shape[2], chunk_size), nk) - 1
    starts = torch.zeros_like(drops, dtype=torch.bool)
    starts[:, 0] = True
    if wanted > 0:
        values, idx = candidates.topk(wanted, dim=-1)
        starts.scatter_(1, idx, values > float("-inf"))
        starts[:, 0] = True
    return starts


def chunk_scores(q: torch.Tensor, k: torch.Tensor, starts: torch.Tensor, *, block_size: int, key_block: int,
                 share: str) -> torch.Tensor:
    """The upsampled chunk scores ``(B, Hs, Nq, Nk)``: ``S[a, c(b)]`` for query block ``a`` and key block ``b`` in
    chunk ``c(b)`` (``starts (B|1, Nk)``, True where a chunk starts); ``Hs`` = 1, Hkv or H for ``share``."""
    b, h, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    qf, kf = q.detach().float(), k.detach().float()
    if share == "all":
        qf, kf = qf.mean(dim=1, keepdim=True), kf.mean(dim=1, keepdim=True)
    elif share == "group":
        qf = qf.view(b, hkv, h // hkv, sq, d).mean(dim=2)
    q_rows = torch.full((_cdiv(sq, block_size), 1), float(block_size), device=q.device)
    q_rows[-1] = sq - (q_rows.shape[0] - 1) * block_size
    q_hat = block_means(qf, block_size) * q_rows.sqrt()  # (B, Hs, Nq, D)
    nk = _cdiv(skv, key_block)
    k_rows = torch.full((nk,), float(key_block), device=k.device)
    k_rows[-1] = skv - (nk - 1) * key_block
    block_sums = block_means(kf, key_block) * k_rows.unsqueeze(1)  # (B, Hk, Nk, D)
    chunk = (starts.long().cumsum(dim=1) - 1).expand(b, nk)  # (B, Nk): each key block's chunk
    sums = torch.zeros_like(block_sums).scatter_add_(2, chunk[:, None, :, None].expand_as(block_sums), block_sums)
    sizes = torch.zeros(b, nk, device=k.device).scatter_add_(1, chunk, k_rows.expand(b, nk))
    k_hat = sums / sizes.clamp(min=1).sqrt()[:, None, :, None]  # mean · √size = sum / √size
    hs, hk = q_hat.shape[1], k_hat.shape[1]
    scores = (q_hat.view(b, hk, hs // hk, -1, d) @ k_hat.unsqueeze(2).transpose(-1, -2)).view(b, hs, -1, nk)
    return scores.gather(3, chunk[:, None, None, :].expand_as(scores))


def always_kept(*, seq_q: int, seq_kv: int, block_size: int, key_block: int, sink: int, local: int,
                device: torch.device) -> torch.Tensor:
    """``(Nq, Nk)`` bool: the sink blocks (the first ``⌈sink / key_block⌉``) and each query block's local blocks (the
    ``⌈local / key_block⌉`` ending at the block of its last query's aligned key ``min(last + Skv − Sq, Skv − 1)``)."""
    nq, nk = _cdiv(seq_q, block_size), _cdiv(seq_kv, key_block)
    blocks = torch.arange(nk, device=device)
    last = torch.clamp((torch.arange(nq, device=device) + 1) * block_size, max=seq_q) - 1 + seq_kv - seq_q
    anchor = torch.clamp(last, max=seq_kv - 1).div(key_block, rounding_mode="floor").unsqueeze(1)
    recent = (blocks <= anchor) & (blocks > anchor - _cdiv(local, key_block))
    return recent | (blocks < _cdiv(sink, key_block))


def select(q: torch.Tensor, k: torch.Tensor, *, causal: bool, **params: Any) -> BlockSelection:
    """DHSA's selection for ``q (B, H, Sq, D)`` and ``k (B, Hkv, Skv, D)``: ``BlockSelection`` with ``block_q =
    block_size``, ``block_k = key_block`` and ``budget / key_block`` key blocks per (batch, selection head, query
    block) (fewer where fewer are visible); the rule of the module docstring. ``params``: those of :data:`SPEC`,
    their defaults where not given."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise fail(sorted(unknown)[0], f"a parameter of dhsa ({', '.join(DEFAULTS)})", "an unknown name")
    p = {**DEFAULTS, **params}
    block_size, key_block, share = p["block_size"], p["key_block"], p["share"]
    if share not in SHARES:
        raise fail("share", f"one of {list(SHARES)}", repr(share))
    sq, skv = q.shape[2], k.shape[2]
    if p["boundaries"] is None:
        starts = chunk_starts(k, chunk_size=p["chunk_size"], window=p["window"], key_block=key_block)
    else:
        starts = p["boundaries"][:, ::key_block].clone()
        starts[:, 0] = True
    scores = chunk_scores(q, k, starts.to(q.device), block_size=block_size, key_block=key_block, share=share)
    always = always_kept(seq_q=sq, seq_kv=skv, block_size=block_size, key_block=key_block, sink=p["sink"],
                         local=p["local"], device=q.device)
    return topk_blocks(scores, p["budget"] // key_block, causal=causal, seq_q=sq, seq_kv=skv, block_q=block_size,
                       block_k=key_block, always=always)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, return_lse: bool = False, **params: Any,
) -> Output:
    seen = select(q, k, causal=causal, **params).dense(q.shape[1]) & visible(causal, None, q, k)
    return masked_attention(q, k, v, seen, scale, mask, bias, return_lse)


def causal_rows(selection: BlockSelection) -> BlockSelection:
    """The same causal attention with query blocks of ``block_k`` (``block_q`` a multiple of it): each query block's
    key blocks go to each of its sub-blocks, less those wholly after the sub-block's last query (the causal mask hides
    them anyway). A sub-block's only partial key block is then its diagonal one, which the attend kernel masks with
    one shared triangle instead of per-row logits."""
    bq, bk, sq, skv = selection.block_q, selection.block_k, selection.seq_q, selection.seq_kv
    rows = _cdiv(sq, bk)
    indices = selection.indices.repeat_interleave(bq // bk, dim=2)[:, :, :rows]
    last = torch.clamp((torch.arange(rows, device=indices.device) + 1) * bk, max=sq) - 1 + skv - sq
    anchor = last.div(bk, rounding_mode="floor").view(rows, 1)
    return BlockSelection(indices.masked_fill(indices > anchor, -1), bk, bk, sq, skv)


def torch_selected(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, return_lse: bool = False, **params: Any,
) -> Output:
    selection = select(q, k, causal=causal, **params)
    if causal and selection.block_q > selection.block_k > 1 and selection.block_q % selection.block_k == 0:
        selection = causal_rows(selection)
    return selected_attention(q, k, v, selection, scale=scale, causal=causal, mask=mask, bias=bias,
                              return_lse=return_lse)


register(SPEC, reference, [Backend("torch", torch_selected, lse=True)])
