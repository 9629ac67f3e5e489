"""P10 — group / isolation masks: attention restricted to tokens with the same group id.

Papers (the mask these share, catalogue entry P10): packed-document masking; "Group Pose: A Simple Baseline for
End-to-End Multi-person Pose Estimation" (within-instance group self-attention); "Seg2Any: Open-set
Segmentation-Mask-to-Image Generation with Precise Shape and Semantic Control" and IR-Diffusion (region isolation);
"DyST-XL: Dynamic Layout Planning and Content Control for Compositional Text-to-Video Generation" (frame-aware
masking); "EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large Language Model". The mechanism is one
predicate.

Formula as implemented: query ``i`` of batch ``b`` attends with softmax to the keys ``j`` with
``group_ids[b, i] == kv_group_ids[b, j]`` (AND bottom-right causal when ``causal=True``, AND the user mask);
``s = scale · q·k + bias``; a query whose group has no key gives 0. ``group_ids``: integer tensor ``(Sq,)`` (shared
by the batch) or ``(B, Sq)``; ``kv_group_ids``: the keys' ids for cross-attention (``(Skv,)`` or ``(B, Skv)``),
defaulting to ``group_ids`` in self-attention. ``group_ids=None`` puts every token in one group (plain softmax
attention). Ids need not be sorted or contiguous. The predicate is :func:`attnzoo.masks.groups.grouped`.

Fast path ``torch`` (:func:`torch_segments`): per distinct ids row, queries and keys are stably sorted by id; each group
present on both sides is one SDPA call on its gathered queries and keys (``is_causal`` when the query and key positions
of the group coincide, an explicit mask otherwise), outputs scattered back. Time Σ_g n_g·m_g·d instead of N²·d; memory
is that of the largest group's mask at most (none for plain self-attention groups). No ``flex`` path: its block mask
would depend on the id tensors' contents, which a configuration cache cannot key.

Log-sum-exp (``return_lse=True``): the output is one softmax over the keys of the query's group, so each row's
log-sum-exp is returned (``-inf`` for a query whose group has no key): each group's call is
:func:`attnzoo.kernels.dense.attention_lse` instead of SDPA, with the same mask.

Decoding (:data:`DECODER`): the ids are per-token parameters (``Decoder.token_params``): the prefill takes the
prompt's ``(S,)`` or ``(B, S)``, each ``attnzoo.step`` its own tokens' ``(T,)`` or ``(B, T)``. The cache stores every
slot's key id in ``cache.slot_data["group_ids"]`` (so the ids follow the slots through a press), and a new query sees
the slots the forward's predicate (:func:`attnzoo.masks.groups.grouped`, evaluated on the query's id and the slots'
ids) and causality show it. ``group_ids=None``: one group, S1's step. :func:`decode_prefill` runs
:func:`torch_segments` causally over the prompt (padding comes after every real token, so no real query sees it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo import masks
from attnzoo.kernels.dense import attention_lse
from attnzoo.kv.attend import softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.masks.groups import grouped as grouped_mod
from attnzoo.methods.common import Output, dense_scores, repeat_kv, softmax_rows, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Call, Decoder, MethodSpec, Param, TestHints, register


def _check_ids(length_of: str) -> Any:
    def check(value: Any, call: Call) -> str | None:
        if length_of == "seq_q" and call.cross and call.params.get("kv_group_ids") is None:
            return "kv_group_ids to be given too in cross-attention (seq_q != seq_kv)"
        n = getattr(call, length_of)
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            return "an integer tensor"
        if value.shape not in ((n,), (call.batch, n)):
            return f"shape ({n},) or ({call.batch}, {n})"
        return None

    return check


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    ids = {"group_ids": torch.randint(0, 3, (call.batch, call.seq_q), generator=generator)}
    if call.cross:
        ids["kv_group_ids"] = torch.randint(0, 3, (call.seq_kv,), generator=generator)
    return ids


SPEC = MethodSpec(
    name="grouped",
    family="structured",
    mechanism="P10",
    paper="Group / isolation masks (packed documents; Group Pose; Seg2Any; IR-Diffusion; DyST-XL; EE-MLLM)",
    arxiv=None,
    summary="attention only between tokens with equal group ids (documents, instances, regions, frames)",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(
        Param("group_ids", (torch.Tensor,), None, "integer group id per query, (Sq,) or (B, Sq); None: one group",
              check=_check_ids("seq_q")),
        Param("kv_group_ids", (torch.Tensor,), None, "integer group id per key, (Skv,) or (B, Skv); None: group_ids",
              check=_check_ids("seq_kv")),
    ),
    complexity="O(Σ_g n_g·m_g·d) time, O(N·d) memory",
    subquadratic_memory=True,
    lse=True,
    tests=TestHints(sample_params=_sample_params),
)


def _ids(q: torch.Tensor, k: torch.Tensor, group_ids: torch.Tensor | None, kv_group_ids: torch.Tensor | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both id tensors as ``(B', S)`` with ``B'`` 1 or the batch (one group when ``group_ids`` is None)."""
    if group_ids is None:
        return (torch.zeros(1, q.shape[2], dtype=torch.long, device=q.device),
                torch.zeros(1, k.shape[2], dtype=torch.long, device=q.device))
    kv = group_ids if kv_group_ids is None else kv_group_ids
    qi, ki = group_ids.reshape(-1, q.shape[2]), kv.reshape(-1, k.shape[2])
    if qi.shape[0] != ki.shape[0]:
        qi, ki = qi.expand(q.shape[0], -1), ki.expand(q.shape[0], -1)
    return qi, ki


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, group_ids: torch.Tensor | None, kv_group_ids: torch.Tensor | None,
    return_lse: bool = False,
) -> Output:
    b, h, sq, _ = q.shape
    qi, ki = _ids(q, k, group_ids, kv_group_ids)
    same = masks.dense(grouped_mod(qi.expand(b, -1), ki.expand(b, -1)), b, h, sq, k.shape[2], q.device)
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    return softmax_rows(s, same & visible(causal, mask, q, k), repeat_kv(v, h), return_lse)


def torch_segments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, group_ids: torch.Tensor | None, kv_group_ids: torch.Tensor | None,
    return_lse: bool = False,
) -> Output:
    h, sq = q.shape[1], q.shape[2]
    skv, dv = k.shape[2], v.shape[-1]
    qids, kids = _ids(q, k, group_ids, kv_group_ids)
    same_positions = sq == skv and (kv_group_ids is None or torch.equal(qids, kids))
    rows, lse_rows = [], []
    for r in range(qids.shape[0]):
        bs = slice(None) if qids.shape[0] == 1 else slice(r, r + 1)
        qb, kb, vb = q[bs], k[bs], v[bs]
        q_order, k_order = torch.sort(qids[r], stable=True), torch.sort(kids[r], stable=True)
        q_groups, q_counts = torch.unique_consecutive(q_order.values, return_counts=True)
        k_groups, k_counts = torch.unique_consecutive(k_order.values, return_counts=True)
        k_start = dict(zip(k_groups.tolist(), (torch.cumsum(k_counts, 0) - k_counts).tolist(), strict=True))
        k_len = dict(zip(k_groups.tolist(), k_counts.tolist(), strict=True))
        pieces, placed, start = [], [], 0
        for gid, count in zip(q_groups.tolist(), q_counts.tolist(), strict=True):
            qi = q_order.indices[start : start + count]
            start += count
            if gid not in k_len:
                continue
            ki = k_order.indices[k_start[gid] : k_start[gid] + k_len[gid]]
            pieces.append(_group_attention(qb, kb, vb, qi, ki, bs, causal, same_positions, scale, mask, bias,
                                           return_lse))
            placed.append(qi)
        # the extra row stands for queries whose group has no key (0, log-sum-exp -inf)
        blank = [qb.new_zeros(qb.shape[0], h, sq + 1, dv)]
        if return_lse:
            blank.append(torch.full((qb.shape[0], h, sq + 1), float("-inf"), dtype=torch.promote_types(
                q.dtype, torch.float32), device=q.device))
        placed_rows = _placed(pieces, placed, blank, sq)
        rows.append(placed_rows[0])
        lse_rows += placed_rows[1:]
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    if not return_lse:
        return out
    return out, lse_rows[0] if len(lse_rows) == 1 else torch.cat(lse_rows, dim=0)


def _placed(pieces: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], placed: list[torch.Tensor],
            blank: list[torch.Tensor], sq: int) -> list[torch.Tensor]:
    """The groups' outputs (and log-sum-exps) ``pieces`` of the query rows ``placed`` put back in query order, the
    rows of no group taken from ``blank`` (one ``(B, H, Sq + 1, ·)`` tensor per output)."""
    if not pieces:
        return [x[:, :, :sq] for x in blank]
    where = torch.full((sq,), sq, dtype=torch.long, device=blank[0].device)
    order = torch.cat(placed)
    where[order] = torch.arange(order.numel(), device=where.device)
    per_output = zip(*(p if isinstance(p, tuple) else (p,) for p in pieces), strict=True)
    return [torch.cat([torch.cat([y.to(x.dtype) for y in ys], dim=2), x[:, :, : sq + 1 - order.numel()]],
                      dim=2)[:, :, where] for ys, x in zip(per_output, blank, strict=True)]


def _group_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor, bs: slice, causal: bool,
    same_positions: bool, scale: float, mask: torch.Tensor | None, bias: torch.Tensor | None, return_lse: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    gqa = q.shape[1] != k.shape[1]
    qg, kg, vg = q[:, :, qi], k[:, :, ki], v[:, :, ki]
    if mask is None and bias is None and (not causal or same_positions):
        if return_lse:
            return attention_lse(qg, kg, vg, causal=causal, scale=scale, mask=None, bias=None)
        return F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, scale=scale, enable_gqa=gqa)
    seen = torch.ones(1, 1, qi.numel(), ki.numel(), dtype=torch.bool, device=q.device)
    if causal:
        seen = seen & (ki.view(1, -1) <= qi.view(-1, 1) + (k.shape[2] - q.shape[2]))
    if mask is not None:
        seen = seen & masks.pairs(_batch_rows(mask, bs), qi, ki)
    if return_lse:
        rows_bias = None if bias is None else masks.pairs(_batch_rows(bias, bs), qi, ki)
        return attention_lse(qg, kg, vg, causal=False, scale=scale, mask=seen, bias=rows_bias)
    some = seen.any(dim=-1, keepdim=True)
    attn = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~(seen | ~some), float("-inf"))
    if bias is not None:
        attn = attn + masks.pairs(_batch_rows(bias, bs), qi, ki)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn, scale=scale, enable_gqa=gqa)
    return out * some.to(out.dtype)


def _batch_rows(t: torch.Tensor, bs: slice) -> torch.Tensor:
    """The batch rows ``bs`` of a 4-D mask/bias (a size-1 batch axis kept for broadcasting)."""
    return t if t.shape[0] == 1 else t[bs]


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, group_ids: torch.Tensor | None,
    kv_group_ids: torch.Tensor | None, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal grouped attention over a (right-padded) prompt; the cache of its keys, values and key ids."""
    out = torch_segments(q, k, v, causal=True, scale=scale, mask=None, bias=None, group_ids=group_ids,
                         kv_group_ids=kv_group_ids)
    cache = KVCache.from_prompt(k, v, lengths)
    if group_ids is None:
        return out, cache
    return out, replace(cache, slot_data={**cache.slot_data, IDS: _slot_ids(q, k, group_ids, kv_group_ids)})


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    group_ids: torch.Tensor | None, kv_group_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence: append it with its key id, attend over the slots of its group."""
    if group_ids is None:
        cache = cache.append(k, v)
        return softmax_attention(cache, q, scale), cache
    ids = cache.slot_data[IDS]
    cache = replace(cache, slot_data={n: t for n, t in cache.slot_data.items() if n != IDS}).append(k, v)
    ids = torch.cat([ids, _slot_ids(q, k, group_ids, kv_group_ids)], 2)
    cache = replace(cache, slot_data={**cache.slot_data, IDS: ids})
    b, heads, t = q.shape[:3]
    rows = ids.repeat_interleave(heads // ids.shape[1], 1).reshape(b * heads, -1)  # key ids per query head
    q_rows = _ids(q, k, group_ids, kv_group_ids)[0].expand(b, t).repeat_interleave(heads, 0)
    row = torch.arange(b * heads, device=q.device).view(b, heads, 1, 1)  # the predicate's batch index: a table row
    same = grouped_mod(q_rows, rows)(row, row, torch.arange(t, device=q.device).view(1, 1, t, 1),
                                     torch.arange(cache.slots, device=q.device).view(1, 1, 1, -1))
    return softmax_attention(cache, q, scale, visible=same), cache


def _slot_ids(q: torch.Tensor, k: torch.Tensor, group_ids: torch.Tensor, kv_group_ids: torch.Tensor | None
              ) -> torch.Tensor:
    """The keys' ids as per-slot data ``(B, Hkv, S)``."""
    ids = _ids(q, k, group_ids, kv_group_ids)[1]
    return ids.expand(k.shape[0], -1).unsqueeze(1).expand(-1, k.shape[1], -1).contiguous()


IDS = "group_ids"  # the cache's per-slot key ids (cache.slot_data)

DECODER = Decoder(decode_prefill, decode_step, token_params=("group_ids", "kv_group_ids"), kv_cache=True)

register(SPEC, reference, [Backend("torch", torch_segments, lse=True)], DECODER)
