"""The key-block-major schedule of :func:`attnzoo.kernels.block_sparse.selected_attention`: attention over a block
selection made per query *token*, grouped by key block (MoBA's "varlen" trick).

A selection whose rows are single tokens (``block_q = 1``: MoBA routes every query token to its own ``top_k`` key
blocks) has no query blocks to gather key blocks for: gathering ``top_k`` key blocks per token would copy
``N·top_k·block_k·d`` keys. Instead, as MoBA's efficient kernel does, the (query token, key block) pairs are grouped
by key block: each key block meets the queries that chose it, as an expert meets its tokens in a mixture of experts.
The pairs are sorted by ``(batch, KV head, key block)``, the queries gathered once in that order, and each group is
one attention call of its queries against its key block, read in place (no K/V copies; the query heads of a GQA
group share the group's blocks). Pairs whose block needs the token-level mask (a causal block not wholly before
the query, a ragged last block) form groups of their own with a mask. When every query selects its own block under
a causal self-attention call (MoBA), those diagonal pairs are instead one causal call over the diagonal blocks (no
mask tensor).

Each call returns its rows' outputs and log-sum-exps; each query's rows are merged exactly
(``L = log Σ exp(lse_r)``, ``O = Σ exp(lse_r − L)·o_r``, a scatter per query).

- CPU with ``D == Dv`` (:class:`_Routed`): the calls are PyTorch's CPU flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``, what SDPA dispatches to); the backward pass is the
  ring-attention identity, as :mod:`attnzoo.kernels.union`: each call's kernel backward gets ``dO`` and the *global*
  ``O`` and ``L`` of its rows, so its ``dQ``/``dK``/``dV`` is its exact share, scatter-added. Saved: Q, K, V, O, L.
- elsewhere (:func:`_groups_torch`): the same groups in plain torch ops with autograd.

``return_lse=True`` also returns the merged ``L`` (``-inf`` on rows that see no key); on CPU its gradient rides along
in each call's kernel backward (:func:`attnzoo.kernels.dense.lse_grad_inputs`, with the global ``O`` and ``L``).

Time ``O(pairs·block_k·d)`` plus a Python step per non-empty group (``B·Hkv·⌈Skv/block_k⌉`` at most); memory
``O(pairs·d)``. The causal mask is token-level inside the selected blocks (query ``i`` sees key
``j ≤ i + seq_kv − seq_q``); keys past ``seq_kv`` are never seen; a query with nothing selected or visible gives 0.
Masked logits are a large finite negative (never NaN); a row that sees nothing is zeroed after the merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from attnzoo.kernels.dense import flash_cpu, flash_cpu_backward, lse_grad_inputs
from attnzoo.kernels.selection import BlockSelection

BUCKET = 128


@dataclass(frozen=True)
class _Plan:
    """The pairs sorted by group: ``row (P,)`` each pair's query row in ``(B·H·Sq)`` order; ``groups``: per non-empty
    group ``(start, end, key block in (B·Hkv·Nk) order, additive mask (1, 1, end − start, block_k) or None)``;
    ``diagonal``: the causal diagonal blocks are attended by one extra call; ``shape`` = ``(B, H, Hkv, Sq, Nk)``;
    ``buckets``: the unmasked groups batched by size rounded up to :data:`BUCKET` rows, one fused call each: per bucket
    ``(query rows (n, size), key blocks (n,))``; padding lanes name query row ``rows`` (the forward reads any real row
    there, the backward a zero row with ``dO = 0``). ``lanes``: the query row of each row the forward's calls return,
    in call order (the buckets' lanes, padding included, then the masked groups' pairs, then the diagonal blocks'
    rows), so that each call's output is merged as it is, with no copy into pair slots (padding lanes merge into the
    extra row ``rows``, dropped)."""

    row: torch.Tensor
    groups: list[tuple[int, int, int, torch.Tensor | None]]
    diagonal: bool
    shape: tuple[int, int, int, int, int]
    buckets: list[tuple[torch.Tensor, torch.Tensor]]
    lanes: torch.Tensor

    @property
    def rows(self) -> int:
        b, h, _, sq, _ = self.shape
        return b * h * sq


def _plan(selection: BlockSelection, b: int, h: int, hkv: int, causal: bool, dtype: torch.dtype,
          device: torch.device, split_diagonal: bool) -> _Plan:
    sq, skv, bk, nb = selection.seq_q, selection.seq_kv, selection.block_k, selection.num_kv_blocks
    idx = selection.indices
    if idx.shape[1] != h:
        idx = idx.repeat_interleave(h // idx.shape[1], dim=1)
    if selection.block_q != 1:
        idx = idx.repeat_interleave(selection.block_q, dim=2)[:, :, :sq]
    slots = idx.shape[-1]
    flat = idx.reshape(-1)
    kept = (flat >= 0).nonzero().squeeze(1)
    row, block = kept // slots, flat[kept]
    query_pos = row % sq + skv - sq
    own = block == query_pos.div(bk, rounding_mode="floor")
    # every query sees its own block (MoBA): the causal diagonal blocks run as one causal call, no mask
    diagonal = split_diagonal and causal and sq == skv and int(own.sum()) == b * h * sq
    if diagonal:
        row, block, query_pos = row[~own], block[~own], query_pos[~own]
    last_key = torch.clamp((block + 1) * bk, max=skv) - 1
    needs_mask = (block + 1) * bk > skv
    if causal:
        needs_mask = needs_mask | (last_key > query_pos)
    n_groups = b * hkv * nb
    group = ((row // (h * sq)) * hkv + (row // sq) % h // (h // hkv)) * nb + block
    key = group + needs_mask.long() * n_groups  # masked pairs in groups of their own
    order = key.argsort(stable=True)
    row, key = row[order], key[order]
    counts = torch.bincount(key, minlength=2 * n_groups).tolist()
    groups: list[tuple[int, int, int, torch.Tensor | None]] = []
    start = 0
    for g, count in enumerate(counts):
        if not count:
            continue
        mask = None
        if g >= n_groups:
            key_pos = (g % nb) * bk + torch.arange(bk, device=device)
            seen = (key_pos < skv).expand(count, bk)
            if causal:
                seen = seen & (key_pos <= (row[start: start + count] % sq + skv - sq).unsqueeze(1))
            mask = torch.zeros(1, 1, count, bk, dtype=dtype, device=device).masked_fill(
                ~seen, -torch.finfo(dtype).max / 2)
        groups.append((start, start + count, g % n_groups, mask))
        start += count
    rows, pairs = b * h * sq, row.shape[0]
    by_size: dict[int, list[tuple[int, int, int]]] = {}
    for first, end, block_id, mask in groups:
        if mask is None:
            by_size.setdefault(-(-(end - first) // BUCKET) * BUCKET, []).append((first, end, block_id))
    row_ext = torch.cat([row, torch.tensor([rows], device=device)])
    buckets = []
    for size, members in sorted(by_size.items()):
        firsts, ends, ids = (torch.tensor(c, device=device) for c in zip(*members, strict=True))
        lane = firsts.unsqueeze(1) + torch.arange(size, device=device)
        buckets.append((row_ext[torch.where(lane < ends.unsqueeze(1), lane, pairs)], ids))
    lanes = [bucket_rows.flatten() for bucket_rows, _ in buckets]
    lanes += [row[first:end] for first, end, _, mask in groups if mask is not None]
    if diagonal:
        lanes.append(torch.arange(rows, device=device))
    return _Plan(row, groups, diagonal, (b, h, hkv, sq, nb), buckets,
                 torch.cat(lanes) if lanes else row.new_empty(0))


def _blocks(x: torch.Tensor, nb: int, bk: int) -> torch.Tensor:
    """``(B, Hkv, S, ·)`` as ``(B·Hkv·Nk, block_k, ·)`` key/value blocks (the ragged last one zero-padded)."""
    pad = nb * bk - x.shape[2]
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(-1, bk, x.shape[-1])


def _diagonal_rows(x: torch.Tensor, plan: _Plan, bk: int) -> torch.Tensor:
    """Per-row ``(B·H·Sq, ·)`` tensor as causal diagonal blocks ``(B·H·Nk, 1, block_k, ·)`` (ragged tail padded)."""
    b, h, _, sq, nb = plan.shape
    x = x[: plan.rows].view(b * h, sq, -1)
    return (F.pad(x, (0, 0, 0, nb * bk - sq)) if nb * bk != sq else x).view(b * h * nb, 1, bk, -1)


def _diagonal_kv(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Key/value blocks ``(B·Hkv·Nk, block_k, ·)`` as the query heads' diagonal blocks ``(B·H·Nk, 1, block_k, ·)``
    (a GQA group's heads read copies of their KV head's blocks: the diagonal only, O(N·d) per head)."""
    b, h, hkv, _, nb = plan.shape
    x = x.view(b, hkv, 1, nb, *x.shape[1:])
    return x.expand(b, hkv, h // hkv, *x.shape[3:]).reshape(b * h * nb, 1, *x.shape[4:])


def _from_diagonal(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The inverse of :func:`_diagonal_rows`: ``(B·H·Sq, ·)``."""
    b, h, _, sq, _ = plan.shape
    return x.reshape(b * h, -1, x.shape[-1])[:, :sq].reshape(plan.rows, x.shape[-1])


def _merge(row: torch.Tensor, outs: list[torch.Tensor], lse: torch.Tensor, rows: int, *, in_place: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query row, the exact merge of partial outputs: ``outs`` are consecutive pieces ``(P_i, Dv)`` of the ``P``
    partial rows, whose query rows are ``row (P,)`` and log-sum-exps ``lse (P,)``. Returns ``(O, L, dead)``, ``dead``
    the rows that saw no key (their ``O`` is 0). The pieces are weighted and added one by one (never concatenated);
    ``in_place``: they are scratch buffers (no autograd) and are overwritten."""
    acc = lse.dtype
    top = torch.full((rows,), float("-inf"), dtype=acc, device=lse.device).scatter_reduce(0, row, lse.detach(), "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(lse - top[row])
    total = torch.zeros(rows, dtype=acc, device=lse.device).index_add(0, row, weight)
    merged_lse = top + torch.log(total)
    dead = ~(merged_lse > -torch.finfo(acc).max / 4)
    weight = weight / total.clamp_min(torch.finfo(acc).tiny)[row] * ~dead[row]
    merged = torch.zeros(rows, outs[0].shape[-1], dtype=acc, device=lse.device)
    start = 0
    for piece in outs:
        end = start + piece.shape[0]
        w = weight[start:end].unsqueeze(1)
        weighted = piece.mul_(w) if in_place and piece.dtype == acc else piece.to(acc) * w
        merged.index_add_(0, row[start:end], weighted)
        start = end
    return merged, merged_lse, dead


class _Routed(torch.autograd.Function):
    """The calls of a plan on the CPU flash kernel, merged per query row; ``with_lse``: return ``(out, lse)``
    (``-inf`` on the rows that see no key), the log-sum-exp's gradient riding along in each call's kernel backward
    (:func:`attnzoo.kernels.dense.lse_grad_inputs`: with the global ``O`` and ``L``, each call's share is exact)."""

    @staticmethod
    def forward(ctx: Any, q_rows: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, scale: float,
                plan: _Plan, with_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        acc = torch.promote_types(q_rows.dtype, torch.float32)
        d, dv = q_rows.shape[-1], v_blocks.shape[-1]
        last = q_rows.shape[0] - 1  # padding lanes (query row `rows`) read some real row; they merge into row `rows`
        outs: list[torch.Tensor] = []
        lses: list[torch.Tensor] = []
        for rows, blocks in plan.buckets:
            n, size = rows.shape
            o, lse = flash_cpu(q_rows[rows.clamp(max=last)].view(n, 1, size, d), k_blocks[blocks].unsqueeze(1),
                               v_blocks[blocks].unsqueeze(1), 0.0, False, scale=scale)
            outs.append(o.view(-1, dv))
            lses.append(lse.reshape(-1))
        for start, end, block, mask in plan.groups:
            if mask is None:
                continue
            o, lse = flash_cpu(q_rows[plan.row[start:end]].view(1, 1, end - start, d),
                               k_blocks[block].view(1, 1, -1, d), v_blocks[block].view(1, 1, -1, dv), 0.0, False,
                               attn_mask=mask, scale=scale)
            outs.append(o.view(end - start, dv))
            lses.append(lse.view(end - start))
        if plan.diagonal:
            bk = k_blocks.shape[1]
            o, lse = flash_cpu(_diagonal_rows(q_rows, plan, bk), _diagonal_kv(k_blocks, plan),
                               _diagonal_kv(v_blocks, plan), 0.0, True, scale=scale)
            outs.append(_from_diagonal(o, plan))
            lses.append(_from_diagonal(lse.unsqueeze(-1), plan).squeeze(1))
        pair_lse = torch.cat(lses).to(acc)
        out, lse, dead = (x[: plan.rows] for x in _merge(plan.lanes, outs, pair_lse, plan.rows + 1, in_place=True))
        out = out.to(q_rows.dtype)
        ctx.save_for_backward(q_rows, k_blocks, v_blocks, out, lse, dead)
        ctx.scale, ctx.plan = scale, plan
        if not with_lse:
            return out
        ctx.set_materialize_grads(False)
        return out, lse.masked_fill(dead, float("-inf"))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor | None, grad_lse: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | None, ...]:
        q_rows, k_blocks, v_blocks, out, lse, dead = ctx.saved_tensors
        plan: _Plan = ctx.plan
        d, dv = q_rows.shape[-1], v_blocks.shape[-1]
        grad = torch.zeros_like(out) if grad is None else grad.masked_fill(dead.unsqueeze(1), 0)
        if grad_lse is not None:  # carried as an extra column of dO (lse_grad_inputs), sliced off the gradients
            grad_lse = grad_lse.masked_fill(dead, 0)
        dk, dv_ = torch.zeros_like(k_blocks), torch.zeros_like(v_blocks)

        def call(grad_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 row_lse: torch.Tensor, g_lse: torch.Tensor | None, causal: bool, mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """One call's kernel backward, with the log-sum-exp's gradient ``g_lse`` folded in when given."""
            args = (grad_o, q, k, v, o) if g_lse is None else lse_grad_inputs(grad_o, g_lse, q, k, v, o)
            dqc, dkc, dvc = flash_cpu_backward(*args, row_lse, 0.0, causal, attn_mask=mask, scale=ctx.scale)
            return dqc[..., :d], dkc[..., :d], dvc[..., :dv]

        # a zero last row: padding lanes get dO = 0, so they add nothing to dK/dV
        q_ext, grad_ext, out_ext, lse_ext = (F.pad(x, (0, 0, 0, 1)) if x.dim() == 2 else F.pad(x, (0, 1))
                                             for x in (q_rows, grad, out, lse))
        glse_ext = None if grad_lse is None else F.pad(grad_lse, (0, 1))
        dq_ext = torch.zeros_like(q_ext)
        for rows, blocks in plan.buckets:
            n, size = rows.shape
            dqt, dkt, dvt = call(
                grad_ext[rows].view(n, 1, size, dv), q_ext[rows].view(n, 1, size, d), k_blocks[blocks].unsqueeze(1),
                v_blocks[blocks].unsqueeze(1), out_ext[rows].view(n, 1, size, dv), lse_ext[rows].view(n, 1, size),
                None if glse_ext is None else glse_ext[rows].view(n, 1, size), False)
            dq_ext.index_add_(0, rows.flatten(), dqt.reshape(-1, d))
            dk.index_add_(0, blocks, dkt.squeeze(1))
            dv_.index_add_(0, blocks, dvt.squeeze(1))
        for start, end, block, mask in plan.groups:
            if mask is None:
                continue
            n, rows = end - start, plan.row[start:end]
            dqg, dkg, dvg = call(
                grad[rows].view(1, 1, n, dv), q_rows[rows].view(1, 1, n, d), k_blocks[block].view(1, 1, -1, d),
                v_blocks[block].view(1, 1, -1, dv), out[rows].view(1, 1, n, dv), lse[rows].view(1, 1, n),
                None if grad_lse is None else grad_lse[rows].view(1, 1, n), False, mask)
            dq_ext.index_add_(0, rows, dqg.reshape(n, d))
            dk[block] += dkg.reshape(-1, d)
            dv_[block] += dvg.reshape(-1, dv)
        dq = dq_ext[:-1]
        if plan.diagonal:
            b, h, hkv, _, nb = plan.shape
            bk = k_blocks.shape[1]
            dqd, dkd, dvd = call(
                _diagonal_rows(grad, plan, bk), _diagonal_rows(q_rows, plan, bk), _diagonal_kv(k_blocks, plan),
                _diagonal_kv(v_blocks, plan), _diagonal_rows(out, plan, bk),
                _diagonal_rows(lse.unsqueeze(1), plan, bk).squeeze(-1),
                None if grad_lse is None else _diagonal_rows(grad_lse.unsqueeze(1), plan, bk).squeeze(-1), True)
            dq += _from_diagonal(dqd, plan)
            dk += dkd.reshape(b, hkv, h // hkv, nb, bk, d).sum(2).view(dk.shape)
            dv_ += dvd.reshape(b, hkv, h // hkv, nb, bk, dv).sum(2).view(dv_.shape)
        return dq, dk, dv_, None, None, None


def _groups_torch(q_rows: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, scale: float,
                  plan: _Plan, with_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same groups in plain torch ops (autograd; any device; no diagonal split); ``with_lse``: also the merged
    log-sum-exp (``-inf`` on the rows that see no key)."""
    q_sorted = q_rows[plan.row]
    outs, lses = [], []
    for start, end, block, mask in plan.groups:
        s = (q_sorted[start:end] @ k_blocks[block].T) * scale
        if mask is not None:
            s = s + mask.view(end - start, -1)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse.unsqueeze(1)) @ v_blocks[block])
        lses.append(lse)
    out, lse, dead = _merge(plan.row, outs, torch.cat(lses), plan.rows)
    if not with_lse:
        return out.to(q_rows.dtype)
    return out.to(q_rows.dtype), lse.masked_fill(dead, float("-inf"))


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: BlockSelection, *,
                     scale: float, causal: bool, return_lse: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scale·q·kᵀ)v`` of ``q (B, H, Sq, D)`` over the keys of ``k (B, Hkv, Skv, D)`` in the blocks that
    ``selection`` gives each query (and, if ``causal``, at or before it): ``(B, H, Sq, Dv)``; ``return_lse``: and each
    row's log-sum-exp ``(B, H, Sq)`` (float32 at least, ``-inf`` for a row that sees no key), differentiable."""
    b, h, sq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    nb, bk = selection.num_kv_blocks, selection.block_k
    fused = q.device.type == "cpu" and d == dv
    plan = _plan(selection, b, h, hkv, causal, q.dtype, q.device, split_diagonal=fused)
    if not plan.groups and not plan.diagonal:
        out = q.new_zeros(b, h, sq, dv)
        if not return_lse:
            return out
        return out, q.new_full((b, h, sq), float("-inf"), dtype=torch.promote_types(q.dtype, torch.float32))
    run = _Routed.apply if fused else _groups_torch
    result = run(q.reshape(b * h * sq, d), _blocks(k, nb, bk), _blocks(v, nb, bk), scale, plan, return_lse)
    if not return_lse:
        return result.view(b, h, sq, dv)
    out, lse = result
    return out.view(b, h, sq, dv), lse.view(b, h, sq)
