"""D4 — Landmark attention: a landmark token closes every block; its score gates the block (grouped softmax), and at
inference retrieves the top-k blocks.

Paper: "Random-Access Infinite Context Length for Transformers" (Mohtashami & Jaggi, arXiv:2305.16300); code
github.com/epfml/landmark-attention (``lm_benchmark/models/landmark.py``: ``landmark_grouped_softmax``;
``lm_benchmark/models/caches/mem_cache.py`` and ``llama/llama_mem.py``: top-k retrieval).

Layout of the sequence (a choice, the paper's data pipeline): the caller's sequence already holds the landmark tokens.
With ``block_size`` regular tokens per block (the paper's ``mem_freq``, default 50), a block is ``P = block_size + 1``
positions and its landmark is its last one: position ``p`` is in block ``⌊p / P⌋`` and is a landmark iff
``p mod P = block_size``, i.e. landmarks sit at ``(b + 1)·P − 1`` (``add_mem_tokens`` inserts one after every
``mem_freq`` tokens). A last block without its landmark yet is just the current block of the queries in it.

Formula as implemented (causal self-attention; ``s_ij = scale·q_i·k_j``; query ``i`` in block ``c``; ``L_b`` the
landmark of block ``b``): the query sees the regular tokens ``j ≤ i`` of its own block directly, and every selected
past block ``b < c`` through its landmark::

    top-level:  p_i = softmax over  {s_ij : j regular, in block c, j ≤ i}  ∪  {s_iL_b : b ∈ S(i)}
    in block b: π_ij = softmax_{j regular in b}(s_ij)
    O_i = Σ_{j own} p_ij v_j + Σ_{b ∈ S(i)} p_iL_b Σ_{j in b} π_ij v_j

(landmark tokens carry no value: their weight is zero; the query's own block's landmark is hidden, also when the query
is that landmark — as ``landmark_grouped_softmax`` does). Equivalently, a plain softmax over the regular tokens with
the logits of block ``b`` shifted by ``s_iL_b − logsumexp_{j in b}(s_ij)``: this identity is what the fast paths and
the decoder compute.

Two forms, one parameter ``top_k``:

- ``top_k=None`` (default): the training form, ``S(i)`` = every past block (the grouped softmax of the paper's
  training, exact against its dense definition).
- ``top_k=k``: the inference form, ``S(i)`` = the ``k`` past blocks of highest landmark score ``q_i·k_L_b`` (per
  query token and head: the code's default ``cache_selection_method="per_token_and_head"``; the own block is always
  seen and not counted in ``k``), then the same grouped softmax over the retrieved blocks only — as the authors'
  inference code feeds the retrieved blocks, landmarks included, to ``landmark_grouped_softmax`` (a plain softmax
  over the retrieved tokens would weigh the blocks otherwise than the model was trained to). ``k`` at least the
  number of past blocks gives the training form exactly. ``top_k`` larger than the number of blocks ``⌈N / P⌉``
  raises (decoding: the cache grows, a larger ``top_k`` is clamped).

The landmark score used for ranking is ``q·k_L`` in float32 on detached inputs (its order is the softmax's); ties go
to ``torch.topk`` (deterministic for given inputs on a device). No user mask or bias (the paper has neither), no
positional handling (the paper's rotary "memory jump" belongs to the model's projections), no group dropout.

:func:`select` returns the blocks each query token sees (own block plus retrieved ones) as a
:class:`~attnzoo.kernels.selection.BlockSelection` with ``block_q = 1`` and ``block_k = P``, built by the shared rule
:func:`~attnzoo.kernels.selection.topk_blocks` with the own block always chosen.

Reference (:func:`reference`): the dense grouped softmax of the formula, literally: logits viewed as ``(query, block,
position in block)``, the top-level softmax over own tokens and selected landmarks, the in-block softmax, their
product. Fast path ``torch`` (:func:`torch_landmark`):

- training form (:func:`grouped_attention`): query rows in chunks; each chunk's logits against the keys up to its
  last query, shifted by the identity above and normalised with one softmax, then ``P·V``. Time ``O(N²d)`` (the form
  attends to every past block), memory ``O(chunk·N)``; under autograd each chunk is checkpointed, so training memory
  is ``O(N·d)`` plus one chunk.
- inference form (:func:`retrieval_attention`): the own block as ``P × P`` tiles (output and log-sum-exp; the CPU
  flash kernel with a tile mask when no gradient is needed, dense tiles otherwise); the
  retrieved blocks through :func:`attnzoo.kernels.routed.routed_attention` over the regular tokens (landmarks
  dropped), each query repeated once per retrieval slot so that every (query, block) pair gives its own in-block
  output ``Σ π_ij v_j``; the pairs are then merged with weights ``softmax(lse_own, s_iL_b…)``. Time
  ``O(N·(top_k + 1)·P·d)``, memory ``O(N·top_k·d)``. Not one call of the shared
  :func:`~attnzoo.kernels.block_sparse.selected_attention`: the grouped softmax is a two-level softmax, not a plain
  softmax over a block selection (the weight of a block comes from its landmark, not from its keys' mass).

Decoding (:data:`DECODER`): :func:`decode_prefill` runs the torch path over the prompt and keeps a plain
:class:`~attnzoo.kv.cache.KVCache` (landmarks are cached like any token); :func:`decode_step` appends the new
tokens, ranks the past blocks of each new query by its landmark logits over the cache, and attends with the shifted
logits through :func:`attnzoo.kv.attend.softmax_attention`: exactly the causal forward's rows.

No log-sum-exp (``return_lse`` raises): the grouped softmax is two-level — as one softmax, its logits are shifted per
block by ``s_iL_b − logsumexp_{j in b}(s_ij)``, which depends on the whole block, so it is not one softmax over the
keys' own logits and would not merge exactly with attention over other keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from attnzoo.kernels.block_sparse import flash_cpu
from attnzoo.kernels.blockwise import grouped_logits, grouped_pv
from attnzoo.kernels.dense import safe_softmax
from attnzoo.kernels.routed import routed_attention
from attnzoo.kernels.selection import BlockSelection, topk_blocks
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.methods.common import dense_scores, repeat_kv
from attnzoo.registry import Backend, Call, Decoder, MethodSpec, Param, TestHints, register

# Logits per chunk of query rows in the training form (B·H·rows·keys elements, float): a few temporaries of this size
CHUNK_ELEMENTS = 1 << 22


def _blocks(length: int, block_size: int) -> int:
    return -(-length // (block_size + 1))


def _check_top_k(value: int, call: Call) -> str | None:
    if call.decoding:
        return None
    blocks = _blocks(call.seq_kv, call.params.get("block_size", 50))
    return None if value <= blocks else f"at most the number of blocks ⌈{call.seq_kv} / (block_size + 1)⌉ = {blocks}"


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    block_size = int(torch.randint(1, 7, (), generator=generator))
    blocks = _blocks(call.seq_kv, block_size)
    top_k = int(torch.randint(0, blocks + 1, (), generator=generator))
    return {"block_size": block_size, "top_k": top_k or None}


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """Own block + 3 retrieved ones of ``P`` positions each ≈ ``fraction`` of the ``N/2`` keys a causal query sees on
    average."""
    period = max(2, round(fraction * call.seq_kv / 8))
    return {"block_size": period - 1, "top_k": 3}


SPEC = MethodSpec(
    name="landmark",
    family="sparse",
    mechanism="D4",
    paper="Random-Access Infinite Context Length for Transformers (Landmark Attention)",
    arxiv="2305.16300",
    summary="a landmark token closes each block; grouped softmax: the landmark's score gates its block; top_k: "
            "retrieve the top-k blocks by landmark score",
    exact=False,
    patterns=frozenset({"self/causal"}),
    params=(
        Param("block_size", (int,), 50, "regular tokens per block; a landmark follows each block, at positions "
              "(b+1)·(block_size+1)−1 of the given sequence", low=1),
        Param("top_k", (int,), None, "None: training form (every past block, grouped softmax); k: past blocks "
              "retrieved per query by landmark score (the own block extra)", low=1, check=_check_top_k),
    ),
    complexity="training form O(N²d) time, O(N·chunk) memory; top_k: O(N·(top_k+1)·block_size·d + N²d/block_size)",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
)


def landmark_gate(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(B, H, Sq, Nb)`` float32: ``q_i·k_L_b`` for each block's landmark (detached; −inf for a block without its
    landmark yet), the score that ranks the past blocks."""
    period = block_size + 1
    nb = _blocks(k.shape[2], block_size)
    landmarks = k[:, :, block_size::period].detach().float()  # (B, Hkv, complete blocks, D)
    gate = grouped_logits(q.detach().float(), landmarks, 1.0)
    return torch.nn.functional.pad(gate, (0, nb - gate.shape[-1]), value=float("-inf"))


def select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int | None,
           gate: torch.Tensor | None = None) -> BlockSelection:
    """The blocks each query token of a causal self-attention call sees: its own block and the ``top_k`` past blocks
    of highest landmark score (every past block for ``None``), as a ``BlockSelection`` with ``block_q = 1``,
    ``block_k = block_size + 1`` and ``indices (B, H, N, min(top_k + 1, Nb))`` ascending, ``-1`` unused. ``gate``:
    :func:`landmark_gate` of these inputs, if already computed."""
    n, period = q.shape[2], block_size + 1
    nb = _blocks(n, block_size)
    own = (torch.arange(n, device=q.device) // period).view(-1, 1) == torch.arange(nb, device=q.device)
    width = nb if top_k is None else min(top_k + 1, nb)
    gate = landmark_gate(q, k, block_size) if gate is None else gate
    return topk_blocks(gate, width, causal=True, seq_q=n, seq_kv=n, block_q=1, block_k=period, always=own)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: int, top_k: int | None,
) -> torch.Tensor:
    b, h, n, _ = q.shape
    period = block_size + 1
    nb = _blocks(n, block_size)
    pad = nb * period - n
    # logits as (query, block, position in block); padded keys of a ragged last block are never seen
    s = torch.nn.functional.pad(dense_scores(q, k, scale), (0, pad)).reshape(b, h, n, nb, period)
    key = torch.arange(nb * period, device=q.device).view(nb, period)
    regular = (key % period != block_size) & (key < n)
    query = torch.arange(n, device=q.device).view(n, 1, 1)
    own_block = (key // period) == query // period  # (n, nb, period)
    own = own_block & regular & (key <= query)
    chosen = select(q, k, block_size=block_size, top_k=top_k).blocks(h)  # (B, H, n, nb)
    past = chosen & (torch.arange(nb, device=q.device) < torch.arange(n, device=q.device).view(n, 1) // period)
    # top level: the own block's tokens and the chosen past blocks' landmarks
    landmark = s[..., block_size]  # (B, H, n, nb)
    top = safe_softmax(torch.cat([s.flatten(3), landmark], dim=-1),
                       torch.cat([own.flatten(1).expand(b, h, n, -1), past], dim=-1))
    top_tokens, top_landmarks = top[..., : nb * period].view(s.shape), top[..., nb * period:]
    # in each chosen past block: a softmax over its regular tokens, weighted by its landmark's top-level weight
    inside = safe_softmax(s, (past.unsqueeze(-1) & regular))
    weights = top_tokens + top_landmarks.unsqueeze(-1) * inside
    return weights.flatten(3)[..., :n] @ repeat_kv(v, h)


def _shifted_logits(s: torch.Tensor, rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Logits ``s (B, H, r, nb·P)`` of query positions ``rows (r,)`` against whole blocks, as one softmax's logits:
    own-block regular tokens up to the query as they are, regular tokens of a past block shifted by ``s_L −
    logsumexp(block)``, landmarks, later own-block tokens and later blocks −inf."""
    b, h, r, width = s.shape
    period = block_size + 1
    nb = width // period
    s = s.view(b, h, r, nb, period)
    query_block = (rows // period).view(r, 1, 1)
    block = torch.arange(nb, device=s.device).view(1, nb, 1)
    inside = torch.logsumexp(s[..., :block_size], dim=-1, keepdim=True)  # every block's regular tokens
    later = torch.zeros(r, nb, 1, dtype=s.dtype, device=s.device).masked_fill_(block > query_block, float("-inf"))
    bias = torch.where(block < query_block, s[..., block_size:] - inside, later)  # (B, H, r, nb, 1)
    position = torch.arange(width, device=s.device).view(nb, period)
    hidden = (position % period == block_size) | ((block == query_block) & (position > rows.view(r, 1, 1)))
    return (s + bias).masked_fill_(hidden, float("-inf")).view(b, h, r, width)


def _grouped_rows(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, scale: float,
                  block_size: int) -> torch.Tensor:
    """The training form for the query rows ``q_rows`` at positions ``first…`` (``k``, ``v`` padded to whole
    blocks)."""
    r = q_rows.shape[2]
    period = block_size + 1
    width = min(-(-(first + r) // period) * period, k.shape[2])  # keys up to the chunk's last query, whole blocks
    rows = torch.arange(first, first + r, device=q_rows.device)
    s = grouped_logits(q_rows, k[:, :, :width], scale)
    p = torch.softmax(_shifted_logits(s, rows, block_size), dim=-1)
    return grouped_pv(p.to(v.dtype), v[:, :, :width])


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                      block_size: int) -> torch.Tensor:
    """The training form (every past block through its landmark) in chunks of query rows, each checkpointed under
    autograd: ``(B, H, N, Dv)``."""
    b, h, n, _ = q.shape
    period = block_size + 1
    pad = _blocks(n, block_size) * period - n
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad))
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad))
    rows = max(1, min(n, CHUNK_ELEMENTS // max(1, b * h * (n + pad))))
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)) and rows < n
    outs = []
    for first in range(0, n, rows):
        chunk = q[:, :, first: first + rows]
        if recompute:
            outs.append(checkpoint(_grouped_rows, chunk, kp, vp, first, scale, block_size, use_reentrant=False))
        else:
            outs.append(_grouped_rows(chunk, kp, vp, first, scale, block_size))
    return torch.cat(outs, dim=2)


def _own_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query over the regular tokens of its own block up to it, as ``P × P`` tiles: ``(out (B, H, N, Dv),
    lse (B, H, N))``. Without gradients on CPU (``D == Dv``) the tiles run through PyTorch's CPU flash kernel (its
    log-sum-exp has no backward); otherwise densely."""
    b, h, n, d = q.shape
    dv = v.shape[-1]
    period = block_size + 1
    nb = _blocks(n, block_size)
    pad = nb * period - n
    qb = torch.nn.functional.pad(q, (0, 0, 0, pad)).reshape(b * h, nb, period, d)
    kb = torch.nn.functional.pad(repeat_kv(k, h), (0, 0, 0, pad)).reshape(b * h, nb, period, d)
    vb = torch.nn.functional.pad(repeat_kv(v, h), (0, 0, 0, pad)).reshape(b * h, nb, period, dv)
    tri = torch.ones(period, period, dtype=torch.bool, device=q.device).tril()
    seen = tri & (torch.arange(period, device=q.device) != block_size)  # up to the query, never the landmark
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and d == dv and not training:
        logits = torch.zeros(1, 1, period, period, dtype=q.dtype, device=q.device).masked_fill_(~seen, float("-inf"))
        out, lse = flash_cpu(qb, kb, vb, 0.0, False, attn_mask=logits, scale=scale)
        return out.reshape(b, h, nb * period, dv)[:, :, :n], lse.reshape(b, h, nb * period)[:, :, :n].to(q.dtype)
    s = scale * qb @ kb.transpose(-1, -2)  # (B·H, nb, P, P)
    s = s.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # every row sees position 0 of its block
    out = torch.exp(s - lse.unsqueeze(-1)) @ vb
    return out.view(b, h, nb * period, -1)[:, :, :n], lse.view(b, h, nb * period)[:, :, :n]


def _regular_tokens(x: torch.Tensor, blocks: int, block_size: int) -> torch.Tensor:
    """The regular tokens of the first ``blocks`` blocks of ``x (B, Hkv, N, ·)`` (landmarks dropped):
    ``(B, Hkv, blocks·block_size, ·)``."""
    b, hkv, _, d = x.shape
    whole = x[:, :, : blocks * (block_size + 1)].reshape(b, hkv, blocks, block_size + 1, d)
    return whole[..., :block_size, :].reshape(b, hkv, blocks * block_size, d)


def retrieval_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, block_size: int,
                        top_k: int) -> torch.Tensor:
    """The inference form: :func:`select`, then the own block dense, the retrieved blocks per (query, block) pair
    through :func:`~attnzoo.kernels.routed.routed_attention`, merged by landmark weights."""
    b, h, n, d = q.shape
    period = block_size + 1
    complete = n // period  # blocks whose landmark is in the sequence: every past block is one
    landmarks = k[:, :, block_size::period][:, :, :complete]  # (B, Hkv, complete, D)
    raw = grouped_logits(q, landmarks, 1.0)  # (B, H, n, complete): the landmark logits, unscaled
    # fp32 inputs: these are select's float32 scores already (the same product); else select computes its own
    gate = torch.nn.functional.pad(raw.detach(), (0, _blocks(n, block_size) - complete), value=float("-inf"))
    selection = select(q, k, block_size=block_size, top_k=top_k, gate=gate if raw.dtype == torch.float32 else None)
    out_own, lse_own = _own_blocks(q, k, v, scale, block_size)
    own = (torch.arange(n, device=q.device) // period).view(1, 1, n, 1)
    past = selection.indices.to(q.device)
    # the retrieved past blocks (all complete), ascending, in K = (slots of the selection) − 1 slots: the own block
    # (the largest index chosen) dropped
    past = torch.where((past >= 0) & (past < own), past, complete).sort(dim=-1).values[..., :-1]
    past = past.masked_fill(past == complete, -1)  # (B, H, n, K)
    slots = past.shape[-1]
    if slots == 0 or not bool((past >= 0).any()):
        return out_own
    # scaled landmark logits of the retrieved blocks, -inf in unused slots
    gate = (scale * raw.gather(3, past.clamp(min=0))).masked_fill(past < 0, float("-inf"))  # (B, H, n, K)
    # in-block outputs: query i repeated once per slot, each copy attending its slot's block alone
    k_reg, v_reg = (_regular_tokens(x, complete, block_size) for x in (k, v))
    per_slot = BlockSelection(past.movedim(-1, 2).reshape(b, h, slots * n, 1), 1, block_size, slots * n,
                              complete * block_size)
    q_rep = q.unsqueeze(2).expand(b, h, slots, n, d).reshape(b, h, slots * n, d)
    out_past = routed_attention(q_rep, k_reg, v_reg, per_slot, scale=scale, causal=False)
    out_past = out_past.view(b, h, slots, n, -1).movedim(2, 3)  # (B, H, n, K, Dv)
    weights = torch.softmax(torch.cat([lse_own.unsqueeze(-1), gate.to(lse_own.dtype)], dim=-1), dim=-1)
    merged = (weights[..., 1:].unsqueeze(3).to(out_past.dtype) @ out_past).squeeze(3)
    return weights[..., :1].to(out_own.dtype) * out_own + merged


def torch_landmark(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: int, top_k: int | None,
) -> torch.Tensor:
    if top_k is None:
        return grouped_attention(q, k, v, scale=scale, block_size=block_size)
    return retrieval_attention(q, k, v, scale=scale, block_size=block_size, top_k=top_k)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, block_size: int, top_k: int | None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Landmark attention over a (right-padded) prompt and the cache of its keys and values."""
    out = torch_landmark(q, k, v, causal=True, scale=scale, mask=None, bias=None, block_size=block_size, top_k=top_k)
    return out, KVCache.from_prompt(k, v, lengths)


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, block_size: int,
    top_k: int | None,
) -> tuple[torch.Tensor, KVCache]:
    """``T`` tokens per sequence: append them, rank each new query's past blocks by its landmark logits over the cache,
    attend with the grouped softmax's shifted logits."""
    cache = cache.append(k, v)
    heads, tokens = q.shape[1], q.shape[2]
    period = block_size + 1
    q_pos = cache.query_positions(tokens).long()  # (B, 1, T, 1)
    k_pos = cache.key_positions(heads).long()  # (B, H, 1, L), -1 for empty slots
    seen = cache.visible_to(q_pos, heads)  # (B, H, T, L)
    nb = max(1, _blocks(int(cache.length.max()), block_size))
    block = torch.where(k_pos >= 0, k_pos // period, nb)  # empty slots: an extra column
    landmark = (k_pos % period == block_size) & (k_pos >= 0)
    past = seen & (block < q_pos // period)
    own = seen & (block == q_pos // period) & ~landmark
    # each past block's landmark score (float32, as select ranks them), then the top_k blocks
    column = torch.where(past & landmark, block, nb).expand_as(seen)
    raw = grouped_logits(q.float(), cache.keys.float(), 1.0)
    gate = torch.full(seen.shape[:3] + (nb + 1,), float("-inf"), device=q.device).scatter(3, column, raw)[..., :nb]
    width = nb if top_k is None else min(top_k, nb)
    best, chosen = gate.topk(width, dim=-1)
    kept = torch.zeros_like(gate, dtype=torch.bool).scatter(3, chosen, best > float("-inf"))
    kept = torch.nn.functional.pad(kept, (0, 1))
    retrieved = past & ~landmark & kept.gather(3, block.expand_as(seen))
    # shifted logits: a retrieved block's tokens by s_L − logsumexp(block)
    s = cache.scores(q, scale)
    block_col = torch.where(retrieved, block, nb).expand_as(seen)
    inside = torch.full(gate.shape[:3] + (nb + 1,), float("-inf"), dtype=s.dtype, device=s.device)
    inside = inside.scatter_reduce(3, block_col, s.masked_fill(~retrieved, float("-inf")), "amax")
    top = torch.where(torch.isfinite(inside), inside, torch.zeros_like(inside))
    terms = torch.exp((s - top.gather(3, block_col)).masked_fill(~retrieved, float("-inf")))
    total = torch.zeros_like(inside).scatter_add(3, block_col, terms)
    lse = top + torch.log(total)
    land = torch.full_like(inside, float("-inf")).scatter(3, torch.where(past & landmark, block, nb).expand_as(seen),
                                                          s)
    shift = (land - lse).gather(3, block_col)
    shifted = torch.where(retrieved, s + shift, s)
    return softmax_attention(cache, q, scale, own | retrieved, shifted), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True, chunked=True)

register(SPEC, reference, [Backend("torch", torch_landmark)], DECODER)
