"""D8 — HyperAttention: angular-LSH-sorted block-diagonal attention plus uniformly sampled key columns.

Paper: "HyperAttention: Long-context Attention in Near-Linear Time" (Han, Jayaram, Karbasi, Mirrokni, Woodruff,
Zandieh; arXiv:2310.05098); code github.com/insuhan/hyper-attn (``models/attention/hyper_attn.py``,
``angular_lsh.py``, ``utils.py``).

Formula as implemented (noncausal; ``n_q`` queries, ``n_k`` keys, per batch and head):

1. *sortLSH.* ``r = num_projections`` random Gaussian directions ``P (d, r)`` (one matrix for every head, drawn from
   ``seed``) hash a vector ``x`` to the bits ``[x·P > 0]``, read as an integer ``c`` and mapped to its reflected
   Gray code ``c ⊕ (c >> 1)`` (the code's ``_unit_hamming_distance_array``: neighbouring buckets differ in one bit).
   Queries and keys are stably sorted by their hash.
2. *Block-diagonal part.* The sorted keys are cut into ``n_b = ⌈n_k / block_size⌉`` blocks of ``block_size``, the
   sorted queries into blocks of ``b_q = ⌈⌈n_q / block_size⌉·block_size / n_b⌉`` (``block_size`` when
   ``n_q = n_k``; the code's ``n_query_padded / num_blocks``); the ``a``-th query block sees the ``a``-th key block.
3. *Sampled part.* ``m = sample_size`` key positions of the sorted order are drawn uniformly with replacement (per
   batch and KV head); a query sees each sample not in its own diagonal block, weighted ``w = n_k / m``.
4. The two are merged by log-sum-exp, i.e. one softmax with log-weights::

       O_i = Σ_j W_ij e^{s_ij} v_j / Σ_j W_ij e^{s_ij},  s_ij = scale · q_i·k_j,
       W_ij = [j in i's diagonal block] + w · #{samples equal to j, j not in i's diagonal block}

   When ``n_q < min_seq_len`` the part is exact softmax attention (the code's ``min_seq_len > n_query``).

Causal (self-attention only; the code's recursion): a sequence of ``n ≤ min_seq_len`` is exact causal attention;
a longer one is split into halves: each half is causal HyperAttention recursively, and the second half's queries also
attend the first half's keys by the noncausal rule above; the parts are merged by log-sum-exp. Here the halving
is aligned: with ``λ`` the fewest halvings that bring ``⌈n / 2^λ⌉`` to at most ``min_seq_len``, leaves are
segments of ``ℓ = ⌈n / 2^λ⌉`` positions and level ``t < λ`` has segments of ``ℓ·2^(λ−t)`` positions split at their
middle (the last segment of each level may be partial). For ``n`` divisible by ``2^λ`` this is the code's recursion;
otherwise the code pads every odd half with a zero row, which then takes part in the hash sort — we pad nothing (a
partial last segment's queries keep the level's block layout, the query blocks of ``block_size``). All sub-problems
of one level run as one batch. Cross-attention is noncausal only.

Other choices: samples are drawn per KV head (GQA: the heads of a group share them and the keys' sort); sampling
happens whenever ``sample_size > 0`` (the code skips it when one block covers everything, where every sample would
fall in the diagonal block anyway); the padding of a partial last key block is masked (the code attends to its zero
rows); hashes are computed in float32. Deterministic: the directions and samples come from a ``torch.Generator`` on
the inputs' device seeded with ``seed``, drawn in a fixed order (directions, then each level's samples).

Defaults are the code's: ``block_size=256, sample_size=256, num_projections=7, min_seq_len=4096``.

:func:`plan` computes the hashing and sampling (inspectable: :class:`HyperPlan`). Reference (:func:`reference`): the
plan's weights ``W`` built densely (``(B, H, n_q, n_k)``) and one dense softmax with ``log W`` added. Fast path
``torch`` (:func:`torch_sorted_blocks`): per part, each sorted query block (with the query heads of its KV group
as extra rows) attends to ``[its key block ; the samples]`` gathered by one ``index_select`` of rows, with the
log-weights as additive logits: without gradients on CPU through PyTorch's flash kernel (which returns the
log-sum-exp), else explicit logits ``O(n·(block_size + sample_size))`` under autograd; exact parts and leaves
likewise; the parts merged by log-sum-exp (:func:`attnzoo.kernels.merge.merge`). Memory
``O(n·(block_size + sample_size))`` (leaves: ``O(n·min_seq_len)`` while training). Not a block selection: the
sorted order is per token and the sampled columns carry weights, which
:class:`~attnzoo.kernels.selection.BlockSelection` cannot say, so it does not go through ``selected_attention``.
No decoder (the paper defines none). No log-sum-exp (``return_lse`` raises): the sampled columns carry the weight
``w = n_k / m``, so the output is an importance-sampled estimate of softmax attention, not one softmax over a set of
the keys' own logits, and its normaliser ``log Σ W e^s`` would not merge exactly with attention over other keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.kernels.block_sparse import flash_cpu
from attnzoo.kernels.dense import softmax_attention_lse
from attnzoo.kernels.merge import merge
from attnzoo.methods.common import masked_attention
from attnzoo.registry import NONCAUSAL_PATTERNS, Backend, Call, MethodSpec, Param, TestHints, register


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=generator))

    return {"block_size": draw(1, 5), "sample_size": draw(0, 4), "num_projections": draw(1, 4),
            "min_seq_len": draw(1, 6), "seed": draw(0, 9)}


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """``block_size = sample_size = b``. Noncausal: ``2b`` keys per query, ``b = fraction·n_k / 2``, no exact
    fallback. Causal: leaves of at most ``fraction·n / 2`` positions, ``b`` spread over the hyper levels so that a
    query sees about ``fraction`` of the ``(n + 1) / 2`` keys it may see on average."""
    n = call.seq_kv
    if not call.causal:
        return {"block_size": max(1, round(fraction * n / 2)), "sample_size": max(1, round(fraction * n / 2)),
                "min_seq_len": 1}
    target = fraction * (n + 1) / 2
    min_len = max(2, round(target))
    levels, leaf = _halvings(n, min_len)
    remaining, hyper = target - (leaf + 1) / 2, 0
    for t in range(levels):
        half = leaf << (levels - t - 1)
        if half < min_len:
            remaining -= half / 2  # half the queries see the whole first half exactly
        else:
            hyper += 1  # half the queries see 2b keys
    b = max(1, round(remaining / hyper)) if hyper else 1
    return {"block_size": b, "sample_size": b, "min_seq_len": min_len}


SPEC = MethodSpec(
    name="hyper",
    family="sparse",
    mechanism="D8",
    paper="HyperAttention: Long-context Attention in Near-Linear Time",
    arxiv="2310.05098",
    summary="queries and keys sorted by angular LSH, block-diagonal attention in that order plus uniformly sampled "
            "key columns reweighted by n/m, merged by log-sum-exp; causal by recursive halving",
    exact=False,
    patterns=NONCAUSAL_PATTERNS | {"self/causal"},
    params=(
        Param("block_size", (int,), 256, "keys per block of the sorted block diagonal", low=1),
        Param("sample_size", (int,), 256, "uniformly sampled key columns per head (0: none)", low=0),
        Param("num_projections", (int,), 7, "random directions of the angular LSH (2^r buckets)", low=1, high=30),
        Param("min_seq_len", (int,), 4096, "below this many queries (keys, causal) a part is exact attention", low=1),
        Param("seed", (int,), 0, "seed of the LSH directions and the samples", low=0),
    ),
    complexity="O(N·(block_size + sample_size)·d·log N) time, O(N·(block_size + sample_size)) memory "
               "(causal: + exact leaves of min_seq_len)",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _halvings(n: int, min_seq_len: int) -> tuple[int, int]:
    """The causal recursion's depth ``λ`` (fewest halvings to ``⌈n / 2^λ⌉ ≤ min_seq_len``) and its leaf length."""
    levels = 0
    while _cdiv(n, 1 << levels) > min_seq_len:
        levels += 1
    return levels, _cdiv(n, 1 << levels)


@dataclass(frozen=True)
class HyperPart:
    """One noncausal HyperAttention over ``P`` sub-problems of the same shape: sub-problem ``p`` is the queries
    ``[q_start + p·stride, … + n_q)`` (those ``< seq_q``) against the keys ``[k_start + p·stride, … + n_k)``.

    ``exact``: plain softmax over the sub-problem (``n_q < min_seq_len``); else ``q_order (B, H, P, n_q)`` and
    ``k_order (B, Hkv, P, n_k)`` are the hash-sorted local positions (queries past ``seq_q`` sorted last),
    ``samples (B, Hkv, P, m)`` sampled sorted key positions, ``q_block``/``k_block`` the block sizes and ``weight``
    the samples' weight ``n_k / m``."""

    q_start: int
    k_start: int
    stride: int
    count: int
    n_q: int
    n_k: int
    exact: bool
    q_order: torch.Tensor | None = None
    k_order: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    q_block: int = 0
    k_block: int = 0
    weight: float = 0.0


@dataclass(frozen=True)
class HyperPlan:
    """The hashing and sampling of one call: its noncausal parts and, causal, the leaf length of the exact causal
    leaves (segments ``[s·leaf, (s+1)·leaf)``); every query sees the disjoint union of its parts' keys."""

    parts: tuple[HyperPart, ...]
    leaf: int | None


def lsh_hash(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """The sortLSH bucket of each row of ``x (…, n, d)`` under ``directions (d, r)``: the Gray code of the sign bits
    of ``x·P`` (int64, in ``[0, 2^r)``); float32 arithmetic."""
    bits = (x.float() @ directions) > 0
    code = (bits.long() << torch.arange(directions.shape[1], device=x.device)).sum(-1)
    return code ^ (code >> 1)


def _segments(x: torch.Tensor, start: int, stride: int, count: int, n: int) -> torch.Tensor:
    """``(B, H, count, n, ·)``: rows ``start + p·stride + [0, n)`` of ``x (B, H, S, ·)`` (``stride ≥ n``, or 0 when
    ``count`` is 1), a view; rows past the sequence are zeros (a padded copy)."""
    stride = stride or n
    short = start + count * stride - x.shape[2]
    if short > 0:
        x = F.pad(x, (0, 0, 0, short))
    return x[:, :, start : start + count * stride].unflatten(2, (count, stride))[:, :, :, :n]


def _part(q: torch.Tensor, k: torch.Tensor, directions: torch.Tensor, generator: torch.Generator, *,
          q_start: int, k_start: int, stride: int, count: int, n_q: int, n_k: int, block_size: int,
          sample_size: int, min_seq_len: int) -> HyperPart:
    if n_q < min_seq_len:
        return HyperPart(q_start, k_start, stride, count, n_q, n_k, True)
    # queries past the sequence (a partial last segment) hash past every bucket: sorted last
    past = (q_start + stride * torch.arange(count, device=q.device).unsqueeze(1)
            + torch.arange(n_q, device=q.device)) >= q.shape[2]
    q_hash = lsh_hash(_segments(q, q_start, stride, count, n_q), directions).masked_fill(past, 1 << 62)
    k_hash = lsh_hash(_segments(k, k_start, stride, count, n_k), directions)
    blocks = _cdiv(n_k, block_size)
    q_block = _cdiv(_cdiv(n_q, block_size) * block_size, blocks)
    b, hkv = k.shape[:2]
    samples = torch.randint(n_k, (b, hkv, count, sample_size), generator=generator, device=k.device)
    return HyperPart(q_start, k_start, stride, count, n_q, n_k, False, q_hash.argsort(dim=-1, stable=True),
                     k_hash.argsort(dim=-1, stable=True), samples, q_block, block_size,
                     n_k / sample_size if sample_size else 0.0)


def plan(q: torch.Tensor, k: torch.Tensor, *, causal: bool, block_size: int, sample_size: int, num_projections: int,
         min_seq_len: int, seed: int) -> HyperPlan:
    """The hashing and sampling of HyperAttention for these inputs (module docstring); deterministic for ``seed``."""
    generator = torch.Generator(device=q.device).manual_seed(seed)
    directions = torch.randn(q.shape[-1], num_projections, generator=generator, device=q.device)
    q, k = q.detach(), k.detach()
    sizes = {"block_size": block_size, "sample_size": sample_size, "min_seq_len": min_seq_len}
    if not causal:
        return HyperPlan((_part(q, k, directions, generator, q_start=0, k_start=0, stride=0, count=1,
                                n_q=q.shape[2], n_k=k.shape[2], **sizes),), None)
    n = q.shape[2]
    levels, leaf = _halvings(n, min_seq_len)
    parts = []
    for t in range(levels):
        half = leaf << (levels - t - 1)
        count = _cdiv(n - half, 2 * half)  # segments whose second half holds a query
        parts.append(_part(q, k, directions, generator, q_start=half, k_start=0, stride=2 * half, count=count,
                           n_q=half, n_k=half, **sizes))
    return HyperPlan(tuple(parts), leaf)


def weights(p: HyperPlan, shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
    """The plan's dense weights ``W (B, H, seq_q, seq_kv)`` float64 (module docstring): how much each key counts in
    each query's softmax (0: not seen)."""
    b, h, sq, skv = shape
    out = torch.zeros(b, h, sq + 1, skv, dtype=torch.float64, device=device)  # row sq: queries past the sequence
    if p.leaf is not None:
        i, j = torch.arange(sq, device=device).view(-1, 1), torch.arange(skv, device=device)
        out[:, :, :sq] += ((i // p.leaf == j // p.leaf) & (j <= i)).double()
    for part in p.parts:
        seg = torch.arange(part.count, device=device).view(-1, 1) * part.stride
        rows = (part.q_start + seg + torch.arange(part.n_q, device=device)).clamp(max=sq)  # (P, n_q)
        cols = part.k_start + seg + torch.arange(part.n_k, device=device)  # (P, n_k)
        if part.exact:
            out[:, :, rows.unsqueeze(-1), cols.unsqueeze(1)] += 1.0
            continue
        assert part.q_order is not None and part.k_order is not None and part.samples is not None
        g = h // part.k_order.shape[1]
        # in sorted coordinates (sorted query r, sorted key c): 1 on the diagonal blocks, w·(times c was sampled) off
        same = (torch.arange(part.n_q, device=device).view(-1, 1) // part.q_block
                == torch.arange(part.n_k, device=device) // part.k_block).double()
        drawn = torch.zeros(b, h // g, part.count, part.n_k, dtype=torch.float64, device=device).scatter_add_(
            3, part.samples, torch.ones(part.samples.shape, dtype=torch.float64, device=device))
        sorted_w = same + part.weight * (1 - same) * drawn.repeat_interleave(g, dim=1).unsqueeze(-2)
        # sorted position → sequence position
        row = rows.expand(b, h, -1, -1).gather(3, part.q_order)  # (B, H, P, n_q)
        col = cols.expand(b, h // g, -1, -1).gather(3, part.k_order).repeat_interleave(g, dim=1)  # (B, H, P, n_k)
        bi = torch.arange(b, device=device).view(-1, 1, 1, 1, 1)
        hi = torch.arange(h, device=device).view(1, -1, 1, 1, 1)
        out.index_put_((bi, hi, row.unsqueeze(-1), col.unsqueeze(-2)), sorted_w, accumulate=True)
    return out[:, :, :sq]


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: int, sample_size: int, num_projections: int, min_seq_len: int, seed: int,
) -> torch.Tensor:
    p = plan(q, k, causal=causal, block_size=block_size, sample_size=sample_size, num_projections=num_projections,
             min_seq_len=min_seq_len, seed=seed)
    w = weights(p, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.device)
    log_w = torch.where(w > 0, w.log(), 0.0).to(q.dtype)
    return masked_attention(q, k, v, w > 0, scale, None, log_w)


def _exact_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q (B, H, n_q, D)`` over ``k, v (B, Hkv, n_k, ·)`` and its log-sum-exp (causal: top-left
    aligned, ``n_q == n_k``). Without gradients on CPU, PyTorch's flash kernel (O(n·d) memory); otherwise dense
    logits under autograd (the log-sum-exp feeds the merge, so it needs its gradient)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and q.device.type == "cpu" and q.shape[-1] == v.shape[-1]:
        g = q.shape[1] // k.shape[1]
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return flash_cpu(q, k, v, 0.0, causal, scale=scale)
    mask = None
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return softmax_attention_lse(q, k, v, scale, mask)


def _per_segment(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, P, n, ·)`` as ``(B·P, H, n, ·)``."""
    return x.transpose(1, 2).flatten(0, 1)


def _rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows ``positions (B, Hx, ...)`` (sequence positions, per batch and head of ``x (B, Hx, S, ·)``) as one
    ``index_select`` of whole rows: ``(B, Hx, ..., ·)``."""
    b, hx, s, d = x.shape
    base = (torch.arange(b * hx, device=x.device) * s).view(b, hx, *([1] * (positions.dim() - 2)))
    return x.reshape(b * hx * s, d).index_select(0, (positions + base).flatten()).view(*positions.shape, d)


def _sorted_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: HyperPart, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One hyper part: output and log-sum-exp of each of its sorted query rows, ``(B, H, P, n_b·b_q, Dv)`` and
    ``(B, H, P, n_b·b_q)`` (rows past ``n_q`` repeat the last sorted query).

    Each query block (the ``G`` heads of a KV group stacked as its rows) attends to ``[its key block ; the samples]``
    with additive logits: 0 on the block (``−inf`` on the padding of the last one), ``log w`` on the samples
    (``−inf`` on those in the block). Q and the concatenated K/V rows are gathered by one ``index_select`` each.
    Without gradients on CPU (``D == Dv``) through PyTorch's flash kernel, else with explicit logits under autograd;
    both ``O(n·(block_size + sample_size))`` memory."""
    assert part.q_order is not None and part.k_order is not None and part.samples is not None
    b, h, sq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g, qb, kb, m, count = h // hkv, part.q_block, part.k_block, part.samples.shape[-1], part.count
    nb = _cdiv(part.n_k, kb)
    dev = q.device
    seg = (part.stride * torch.arange(count, device=dev)).view(count, 1)
    q_sorted = part.q_order[..., torch.arange(nb * qb, device=dev).clamp(max=part.n_q - 1)]  # padded: repeats
    q_pos = (part.q_start + seg + q_sorted).clamp(max=sq - 1)  # (B, H, P, nb·qb)
    # (B, Hkv, P, nb, G·qb): query block a of every head of a group, rows head-major
    q_pos = q_pos.view(b, hkv, g, count, nb, qb).permute(0, 1, 3, 4, 2, 5).reshape(b, hkv, count, nb, g * qb)
    q_blocks = _rows(q.reshape(b, hkv, g * sq, d), q_pos + (torch.arange(g, device=dev) * sq).repeat_interleave(
        qb).view(1, 1, 1, 1, g * qb))
    k_sorted = part.k_order[..., torch.arange(nb * kb, device=dev).clamp(max=part.n_k - 1)]
    k_pos = (part.k_start + seg + k_sorted).view(b, hkv, count, nb, kb)
    bias = torch.zeros(nb, kb, dtype=q.dtype, device=dev).masked_fill_(
        (torch.arange(nb * kb, device=dev) >= part.n_k).view(nb, kb), float("-inf")).expand(b, hkv, count, nb, kb)
    if m:
        drawn = (part.k_start + seg + part.k_order.gather(3, part.samples)).unsqueeze(3)  # (B, Hkv, P, 1, m)
        k_pos = torch.cat([k_pos, drawn.expand(-1, -1, -1, nb, -1)], dim=-1)
        own = (part.samples // kb).unsqueeze(3) == torch.arange(nb, device=dev).view(nb, 1)  # (B, Hkv, P, nb, m)
        log_w = torch.full(own.shape, math.log(part.weight), dtype=q.dtype, device=dev).masked_fill_(
            own, float("-inf"))
        bias = torch.cat([bias, log_w], dim=-1)
    k_cat, v_cat = _rows(k, k_pos), _rows(v, k_pos)  # (B, Hkv, P, nb, kb + m, ·)
    bias = bias.unsqueeze(-2)  # (B, Hkv, P, nb, 1, kb + m)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and dev.type == "cpu" and d == dv:
        width = kb + m
        out, lse = flash_cpu(q_blocks.view(-1, 1, g * qb, d), k_cat.view(-1, 1, width, d),
                             v_cat.view(-1, 1, width, dv), 0.0, False,
                             attn_mask=bias.reshape(-1, 1, 1, width), scale=scale)
    else:
        s = (q_blocks @ k_cat.transpose(-1, -2)) * scale + bias
        lse = torch.logsumexp(s, dim=-1)
        out = torch.exp(s - lse.unsqueeze(-1)) @ v_cat
    out = out.reshape(b, hkv, count, nb, g, qb, dv).permute(0, 1, 4, 2, 3, 5, 6).reshape(b, h, count, nb * qb, dv)
    lse = lse.reshape(b, hkv, count, nb, g, qb).permute(0, 1, 4, 2, 3, 5).reshape(b, h, count, nb * qb)
    return out, lse


def _scatter_rows(rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, seq_q: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``out (B, H, R, Dv)``, ``lse (B, H, R)`` placed at sequence positions ``rows (B|1, H|1, R)`` (those
    ``≥ seq_q`` dropped) of a ``(B, H, seq_q, Dv)`` output and ``−inf``-filled log-sum-exp."""
    b, h, _, dv = out.shape
    rows = torch.broadcast_to(rows.clamp(max=seq_q), out.shape[:3])
    full = out.new_zeros(b, h, seq_q + 1, dv).scatter(2, rows.unsqueeze(-1).expand(-1, -1, -1, dv), out)
    lse_full = lse.new_full((b, h, seq_q + 1), float("-inf")).scatter(2, rows, lse)
    return full[:, :, :seq_q], lse_full[:, :, :seq_q]


def _part_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: HyperPart, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One part's output ``(B, H, seq_q, Dv)`` and log-sum-exp (``−inf`` on the rows it does not cover)."""
    b, h, sq, _ = q.shape
    dev = q.device
    local = (part.q_start + part.stride * torch.arange(part.count, device=dev).unsqueeze(1)
             + torch.arange(part.n_q, device=dev))  # (P, n_q) sequence positions
    if part.exact:
        segs = [_per_segment(_segments(x, start, part.stride, part.count, n)) for x, start, n in
                ((q, part.q_start, part.n_q), (k, part.k_start, part.n_k), (v, part.k_start, part.n_k))]
        out, lse = _exact_lse(*segs, scale, False)
        out = out.reshape(b, part.count, h, part.n_q, -1).transpose(1, 2)
        lse = lse.reshape(b, part.count, h, part.n_q).transpose(1, 2)
        return _scatter_rows(local.flatten(), out.flatten(2, 3), lse.flatten(2, 3), sq)
    assert part.q_order is not None
    out, lse = _sorted_blocks(q, k, v, part, scale)
    rows = local.expand(b, h, -1, -1).gather(3, part.q_order)  # sorted row → sequence position
    n = part.n_q
    return _scatter_rows(rows.flatten(2, 3), out[:, :, :, :n].flatten(2, 3), lse[:, :, :, :n].flatten(2, 3), sq)


def torch_sorted_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: int, sample_size: int, num_projections: int, min_seq_len: int, seed: int,
) -> torch.Tensor:
    p = plan(q, k, causal=causal, block_size=block_size, sample_size=sample_size, num_projections=num_projections,
             min_seq_len=min_seq_len, seed=seed)
    outs, lses = [], []
    if p.leaf is not None:  # exact causal attention inside each leaf segment
        n, count = q.shape[2], _cdiv(q.shape[2], p.leaf)
        segs = [_per_segment(_segments(x, 0, p.leaf, count, p.leaf)) for x in (q, k, v)]
        out, lse = _exact_lse(*segs, scale, True)
        b, h = q.shape[:2]
        outs.append(out.reshape(b, count, h, p.leaf, -1).transpose(1, 2).flatten(2, 3)[:, :, :n])
        lses.append(lse.reshape(b, count, h, p.leaf).transpose(1, 2).flatten(2, 3)[:, :, :n])
    for part in p.parts:
        out, lse = _part_attention(q, k, v, part, scale)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0]
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    return merge(outs, [lse.to(lse_dtype) for lse in lses])[0].to(q.dtype)


register(SPEC, reference, [Backend("torch", torch_sorted_blocks)])
