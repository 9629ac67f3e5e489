"""D1 — MoBA: mixture of block attention, each query token routed to its top-k key blocks.

Paper: "MoBA: Mixture of Block Attention for Long-Context LLMs" (Lu et al., arXiv:2502.13189); reference code
github.com/MoonshotAI/MoBA (``moba_naive.py``, the mask-based reference, and ``moba_efficient.py``). Follow-up:
"Optimizing Mixture of Block Attention" (Xiao et al., arXiv:2511.11571, FlashMoBA).

Formula as implemented (causal self-attention, the only pattern MoBA defines): the keys are cut into blocks of
``block_size`` (the last one may be partial). Query token ``i`` (position ``i``, own block ``c = ⌊i / block_size⌋``)
scores every block by its gate ``g_ij = q_i · mean(K_j)`` (the mean over the block's real keys, per KV head: a
query head reads the means of its GQA group's KV head, no copies; unscaled, computed in float32 as MoBA does). Future
blocks (``j > c``) are excluded, the own block ``c`` is always selected and counted in ``top_k``, and the other
``top_k − 1`` are the past blocks of largest gate (fewer when fewer exist). ``top_k`` larger than the number of key
blocks is an error in a forward call (MoBA's reference silently takes ``min(moba_topk, num_block)``, which hides a
misconfiguration); when decoding, the cache grows, so a prompt of fewer than ``top_k`` blocks is accepted.
The query then attends with one softmax to the
keys of its selected blocks, with the token-level causal mask (inside its own block it sees keys ``≤ i``)::

    O_i = softmax_j∈S(i), j≤i (scale · q_i·k_j) V,   S(i) = own block ∪ top_{k−1} past blocks by q_i · mean(K_b)

Ties in the gate are broken by ``torch.topk`` (deterministic for given inputs on a device). The selection is per
query token and per query head (MoBA's gate has one row per token and head), returned by :func:`select` as a
:class:`~attnzoo.kernels.selection.BlockSelection` with ``block_q = 1`` that users can inspect, plot and reuse.

Defaults ``block_size=512, top_k=3``: the paper's main configuration (its scaling-law models: 8K context, blocks of
512, top-3, 81.25% sparsity); the public code's example runs Llama-3.1-8B with blocks of 4096 and top-12.

Key convolution (``key_conv``, optional; from "Optimizing Mixture of Block Attention", which shows that a short
convolution on the keys clusters related signal and raises the router's signal-to-noise ratio): a depthwise causal
convolution of the keys, ``k'_t = Σ_{s<W} w[·, ·, W−1−s] ⊙ k_{t−s}`` (weights ``(Hkv, D, W)``, zeros before the
first token), whose output replaces the keys everywhere (routing and attention), so that gradients reach ``w``.
Our choices: no activation and no residual (the paper's exact block is not public in what we could read), and the
``nn`` layer's initial weights are the identity (``w[·, ·, W−1] = 1``, width 3), so a fresh layer is plain MoBA and
training moves it; pass ``key_conv=None`` to ``attnzoo.nn.Attention`` for MoBA without it. No user mask or bias
(MoBA has neither); only the ``self/causal`` pattern (MoBA defines no noncausal form).

Reference (:func:`reference`): the selection computed by :func:`select` from the same inputs (the same rule; it
needs no fast code), expanded to a dense token mask (:meth:`BlockSelection.dense`) AND causal, then a dense masked
softmax. Fast path ``torch`` (:func:`torch_routed`): :func:`select`, then the D family's attend kernel
:func:`attnzoo.kernels.block_sparse.selected_attention`, which runs a per-token selection key-block-major
(:mod:`attnzoo.kernels.routed`: the (query, key block) pairs grouped by key block, as MoBA's efficient kernel
does): time
``O(N·top_k·block_size·d)``, memory ``O(N·top_k·block_size)``, autograd. Fast path ``flex`` (:func:`flex_routed`):
FlexAttention with a mask predicate reading the selection (its block mask built per call).
The output is one softmax over the selected keys, so the method returns its log-sum-exp (``return_lse=True``; the
torch path's key-major merge computes it anyway).

Decoding (:data:`DECODER`): :func:`decode_prefill` runs the torch path causally over the prompt and keeps a plain
:class:`~attnzoo.kv.cache.KVCache` (of the convolved keys, with the last ``W − 1`` raw keys of each sequence in
``extras["key_tail"]`` when there is a key convolution); :func:`decode_step` appends the new tokens, computes the
block means of the cached keys (blocks by position: :func:`attnzoo.kv.attend.position_block_pool`), selects for each
new query with the same rule (:func:`route`) and attends over the slots of its selected blocks
(:func:`attnzoo.kv.attend.selected_slots`, :func:`~attnzoo.kv.attend.softmax_attention`): exactly the causal
forward's rows, since a query's past blocks are complete and its own block is forced.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.kernels import flex
from attnzoo.kernels.block_sparse import selected_attention
from attnzoo.kernels.blockwise import grouped_logits
from attnzoo.kernels.selection import BlockSelection, block_means, keys_at_density
from attnzoo.kv.attend import position_block_pool, selected_slots, softmax_attention
from attnzoo.kv.cache import KVCache
from attnzoo.methods.common import Output, masked_attention, visible
from attnzoo.registry import Backend, Call, Decoder, LayerInfo, MethodSpec, Param, TestHints, register


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    """Blocks of 1–8 keys, top_k up to 4 (at most the blocks), a random key convolution of width 1–3 half the time."""
    block_size = int(torch.randint(1, 9, (), generator=generator))
    blocks = -(-call.seq_kv // block_size)
    out: dict[str, Any] = {"block_size": block_size,
                           "top_k": int(torch.randint(1, min(4, blocks) + 1, (), generator=generator))}
    if bool(torch.randint(0, 2, (), generator=generator)):
        width = int(torch.randint(1, 4, (), generator=generator))
        weight = torch.randn(call.kv_heads, call.head_dim, width, generator=generator) / width
        out["key_conv"] = weight.to(device=call.device, dtype=call.dtype)
    return out


def _check_top_k(top_k: int, call: Call) -> str | None:
    blocks = -(-call.seq_kv // int(call.params.get("block_size", 512)))
    if call.decoding or top_k <= blocks:
        return None
    return f"at most the number of key blocks, ⌈seq_kv {call.seq_kv} / block_size⌉ = {blocks}"


def _check_key_conv(weight: torch.Tensor, call: Call) -> str | None:
    if weight.dim() != 3 or weight.shape[:2] != (call.kv_heads, call.head_dim) or weight.shape[2] < 1:
        return f"a (kv_heads {call.kv_heads}, head_dim {call.head_dim}, width ≥ 1) tensor of depthwise weights"
    return None


def _identity_conv(info: LayerInfo) -> torch.Tensor:
    weight = torch.zeros(info.kv_heads, info.head_dim, 3)
    weight[..., -1] = 1.0
    return weight


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """Blocks of ``seq_kv / 32`` keys (at least 1) and as many of them as the per-query key budget that reads
    ``fraction`` of the causal pairs (:func:`~attnzoo.kernels.selection.keys_at_density`)."""
    block_size = max(1, call.seq_kv // 32)
    budget = keys_at_density(fraction, causal=True, seq_q=call.seq_q, seq_kv=call.seq_kv)
    return {"block_size": block_size, "top_k": max(1, min(-(-call.seq_kv // block_size), round(budget / block_size)))}


SPEC = MethodSpec(
    name="moba",
    family="sparse",
    mechanism="D1",
    paper="MoBA: Mixture of Block Attention for Long-Context LLMs",
    arxiv="2502.13189",
    summary="each query attends to its own block and the top-k−1 past blocks by q·mean(block keys)",
    exact=False,
    patterns=frozenset({"self/causal"}),
    params=(
        Param("block_size", (int,), 512, "keys per block (the last block may be partial)", low=1),
        Param("top_k", (int,), 3, "blocks per query, its own block included (at most the number of key blocks)",
              low=1, check=_check_top_k),
        Param("key_conv", (torch.Tensor,), None, "depthwise causal convolution of the keys (kv_heads, head_dim, "
              "width), learnable; None: none", check=_check_key_conv, init=_identity_conv),
    ),
    complexity="O(N·top_k·block_size·d + N²d/block_size) time (attention + gate), O(N·top_k·block_size) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
    lse=True,
)


def route(gate: torch.Tensor, own: torch.Tensor, top_k: int) -> torch.Tensor:
    """MoBA's routing rule: ``gate (B, H, T, Nk)`` block scores (overwritten), ``own (·, ·, T, 1)`` each query's own
    block (negative: the query sees nothing). Returns ``(B, H, T, min(top_k, Nk))`` int64 block indices, ``-1`` in
    unused slots: the own block first, then the past blocks (``j < own``) of largest gate; future blocks never."""
    blocks = torch.arange(gate.shape[-1], device=gate.device)
    # one additive term per (query, block): 0 for the past, +inf for the own block, -inf for the future
    rank = torch.zeros(own.shape[:-1] + blocks.shape, device=gate.device).masked_fill_(blocks > own, float("-inf"))
    key = gate.float().add_(rank.masked_fill_(blocks == own, float("inf")))
    values, idx = key.topk(min(top_k, gate.shape[-1]), dim=-1)
    return idx.masked_fill_(values == float("-inf"), -1)


ROUTE_CHUNKS = 8  # select() scores the queries in this many slices, each against the blocks it may see


def select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int) -> BlockSelection:
    """The blocks each query token of a causal call sees: ``BlockSelection`` with ``block_q = 1`` and
    ``indices (B, H, Sq, min(top_k, Nk))`` (the gate of the module docstring, with bottom-right causal positions).

    The queries are gated in :data:`ROUTE_CHUNKS` slices, each only against the blocks up to its last query's own
    block (the others are future blocks for every query of the slice): about half the gate's work under causality."""
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    means = block_means(k.detach().float(), block_size)  # (B, Hkv, Nk, D)
    nk = means.shape[2]
    own = (torch.arange(sq, device=q.device) + skv - sq).div(block_size, rounding_mode="floor").view(-1, 1)
    indices = torch.full((b, h, sq, min(top_k, nk)), -1, dtype=torch.long, device=q.device)
    step = -(-sq // ROUTE_CHUNKS)
    for start in range(0, sq, step):
        stop = min(sq, start + step)
        cols = min(nk, (stop - 1 + skv - sq) // block_size + 1)  # the blocks the slice's last query may see
        if cols <= 0:  # queries before every key see nothing
            continue
        gate = grouped_logits(q[:, :, start:stop].detach().float(), means[:, :, :cols], 1.0)
        chosen = route(gate, own[start:stop], top_k)
        indices[:, :, start:stop, : chosen.shape[-1]] = chosen
    return BlockSelection(indices, 1, block_size, sq, skv)


def convolve_keys(k: torch.Tensor, weight: torch.Tensor | None, tail: torch.Tensor | None = None) -> torch.Tensor:
    """The keys ``k (B, Hkv, S, D)`` after the depthwise causal convolution ``weight (Hkv, D, W)`` (None: ``k``).
    ``tail (B, Hkv, W − 1, D)``: the raw keys just before ``k`` (default zeros: ``k`` starts the sequence)."""
    if weight is None:
        return k
    b, hkv, s, d = k.shape
    width = weight.shape[-1]
    if tail is None:
        tail = k.new_zeros(b, hkv, width - 1, d)
    x = torch.cat([tail, k], dim=2).permute(0, 1, 3, 2).reshape(b, hkv * d, s + width - 1)
    out = F.conv1d(x, weight.to(k.dtype).reshape(hkv * d, 1, width), groups=hkv * d)
    return out.view(b, hkv, d, s).permute(0, 1, 3, 2)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: int, top_k: int, key_conv: torch.Tensor | None = None,
    return_lse: bool = False,
) -> Output:
    if key_conv is not None:  # k'_t = Σ_s w[W − 1 − s] k_{t − s}, tap by tap
        width = key_conv.shape[-1]
        shifted = [torch.nn.functional.pad(k, (0, 0, s, 0))[:, :, : k.shape[2]] for s in range(width)]
        k = sum(key_conv[None, :, None, :, width - 1 - s].to(k.dtype) * x for s, x in enumerate(shifted))
    seen = select(q, k, block_size=block_size, top_k=top_k).dense(q.shape[1]) & visible(causal, None, q, k)
    return masked_attention(q, k, v, seen, scale, mask, bias, return_lse)


def torch_routed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: int, top_k: int, key_conv: torch.Tensor | None = None,
    return_lse: bool = False,
) -> Output:
    k = convolve_keys(k, key_conv)
    selection = select(q, k, block_size=block_size, top_k=top_k)
    return selected_attention(q, k, v, selection, scale=scale, causal=causal, return_lse=return_lse)


def flex_routed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: int, top_k: int, key_conv: torch.Tensor | None = None,
    return_lse: bool = False,
) -> Output:
    k = convolve_keys(k, key_conv)
    blocks = select(q, k, block_size=block_size, top_k=top_k).blocks()  # (B, H, Sq, Nk), one row per token
    offset = k.shape[2] - q.shape[2]

    def moba_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return blocks[b, h, q_idx, kv_idx // block_size] & (kv_idx <= q_idx + offset)

    bm = flex.create_block_mask(moba_mod, q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device)
    return flex.attention(q, k, v, scale=scale, block_mask=bm, return_lse=return_lse)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, block_size: int, top_k: int,
    key_conv: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal MoBA over a (right-padded) prompt and the cache of its (convolved) keys and values; with a key
    convolution, each sequence's last ``W − 1`` raw keys in ``extras["key_tail"]``."""
    out = torch_routed(q, k, v, causal=True, scale=scale, mask=None, bias=None, block_size=block_size, top_k=top_k,
                       key_conv=key_conv)
    cache = KVCache.from_prompt(convolve_keys(k, key_conv), v, lengths)
    if key_conv is None:
        return out, cache
    width = key_conv.shape[-1]
    padded = F.pad(k, (0, 0, width - 1, 0))  # raw key at position p is row p + W − 1; rows before 0 are zeros
    rows = cache.length.view(-1, 1) + torch.arange(width - 1, device=k.device)  # positions length − W + 1 … − 1
    tail = padded.gather(2, rows.view(-1, 1, width - 1, 1).expand(-1, k.shape[1], -1, k.shape[3]))
    return out, replace(cache, extras={**cache.extras, "key_tail": tail})


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, block_size: int, top_k: int,
    key_conv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """``T`` tokens per sequence: append them (convolved), select each new query's blocks over the cache, attend."""
    if key_conv is not None:
        raw = torch.cat([cache.extras["key_tail"], k], dim=2)
        k = convolve_keys(k, key_conv, cache.extras["key_tail"])
        cache = replace(cache, extras={**cache.extras, "key_tail": raw[:, :, raw.shape[2] - key_conv.shape[-1] + 1:]})
    cache = cache.append(k, v)
    tokens = q.shape[2]
    gate = grouped_logits(q.float(), position_block_pool(cache, block_size), 1.0)  # (B, H, T, Nk)
    own = cache.query_positions(tokens).long().div(block_size, rounding_mode="floor")  # (B, 1, T, 1)
    chosen = route(gate, own, top_k)  # (B, H, T, K)
    return softmax_attention(cache, q, scale, selected_slots(cache, chosen, block_size)), cache


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True, chunked=True)

register(SPEC, reference, [Backend("torch", torch_routed, lse=True),
                           Backend("flex", flex_routed, flex.unavailable_masked, lse=True)],
         DECODER)
