"""D3 — PBS-Attn: permuted block-sparse attention, keys reordered inside segments so that important keys share blocks.

Paper: "Sparser Block-Sparse Attention via Token Permutation" (Wang et al., arXiv:2510.21270); public code
github.com/xinghaow99/pbs-attn (``pbs_attn/src/pbs.py``, ``permute_states.py``, ``utils.py``), whose choices this
file follows where the paper leaves them open.

Attention is invariant to a permutation of the keys (with the values permuted alike) and equivariant to one of the
queries. PBS-Attn uses this to make block-sparse attention sparser: it reorders keys so that the few keys a block of
queries needs land in few key blocks, selects blocks on the permuted keys, and attends. Formula as implemented
(self-attention, ``N`` tokens, blocks of ``block_size`` for queries and keys, segments of ``segment_size``, a multiple
of ``block_size``):

1. **Permutation** (:func:`permutation`, the paper's query-aware key permutation): the keys are cut into segments;
   each *complete* segment is sorted by decreasing importance ``s_j = mean_{i ∈ last block, h ∈ KV group}
   softmax_j(scale · q_i·k_j)`` — the attention the last ``block_size`` queries pay to key ``j``, softmax over the
   keys of all complete segments, averaged over those queries and over the query heads of ``j``'s KV head (one
   permutation per KV head, since keys are shared). A trailing partial segment keeps its order. Keys move only
   inside their segment, so which segment a key is in — the only thing causality looks at across segments — is kept.
   Queries keep their order (the public code permutes keys only; query permutation would change which queries share
   a block, never an output), so no output needs un-permuting.
2. **Selection** (:func:`select`): block scores ``S_ab = scale · mean(q in query block a) · mean(k in permuted key
   block b)`` (pooled over the block's real rows). Candidates for query block ``a``: the key blocks of the *earlier*
   segments (causal) or of every *other* segment (noncausal). Among them the fewest blocks whose softmax block mass
   ``softmax_b(S_ab)`` reaches ``threshold`` (:func:`~attnzoo.kernels.selection.threshold_blocks`; ``threshold=1``
   keeps every candidate), or, when ``top_k`` is given, the ``top_k`` best (:func:`~attnzoo.kernels.selection.
   topk_blocks`; used by :func:`at_density` to fix the density). Always added, outside the mass: every block of
   ``a``'s own (diagonal) segment, and with ``sink`` the block holding original key 0 (``force_select_first_block``).
3. **Attention**: one softmax over the keys of the selected blocks AND, when causal, key ``j ≤`` query ``i`` **by
   original position**::

       O_i = softmax_{j ∈ S(i), j ≤ i} (scale · q_i·k_j) V,   S(i) = π(selected permuted blocks of i's query block)

   Only the diagonal segment needs that token-level mask (earlier segments are wholly in the past); it is the whole
   segment in any order, so at full density (``threshold=1``) the result is exactly unpermuted softmax attention.

The causal mask by original position, in O(N) memory (no dense mask): the fast paths attend over extended keys
``K' = [π(K)[:L] ; K]`` (values alike), ``L`` the length of the segments before the last one: the permuted copy of the
past segments, then the keys in their original order. Past-segment blocks are selected in the first part, the
diagonal segment's blocks (up to the query's own block) in the second. With ``seq_kv' = L + N`` the kernel's
bottom-right causal mask ``j' ≤ i + L`` is ``j ≤ i`` on the second part and always true on the first — exactly the
rule above, through :func:`~attnzoo.kernels.block_sparse.selected_attention`'s own causal mask, at the cost of one
extra copy of the keys and values (``O(N·d)``). Noncausal calls attend over ``π(K)`` directly.

Defaults ``block_size=128, segment_size=256, threshold=0.9, sink=True``: the public code's configuration (LongBench
runs on Llama-3.1-8B and Qwen2.5-7B-1M). Choices: the call's ``scale`` scores blocks and importance (the code uses
``1/√d``, the default); a ragged last block is pooled over its real rows (the code pads with zeros); ``top_k`` is an
addition for equal-density comparisons.

Patterns: self-attention only (the paper's prefill setting; segments pair query and key positions), causal and
noncausal (the public code is causal only; the noncausal form drops the "earlier" in step 2). No user mask or bias.
Not a decoder: the permutation is ranked by the last block of queries of the whole prompt (a look-ahead over the
prompt, as the paper's prefill does; gradients never flow through the selection), so a token-by-token decode cannot
reproduce the prefill's selection; decode with a KV cache and full attention, as the paper does.

Reference (:func:`reference`): :func:`select` on the same inputs, its selected blocks mapped back to original key
positions (:meth:`PermutedSelection.dense`), AND causal by position, then a dense masked softmax. Fast path ``torch``
(:func:`torch_permuted`): :func:`select`, the extended keys, :func:`~attnzoo.kernels.block_sparse.
selected_attention`: ``O(density · N² · d)`` time, ``O(N·d)`` memory, autograd. ``flex`` (:func:`flex_permuted`):
FlexAttention over the same extended keys with the selection's block mask (forward only on CPU). The output is one
softmax over a set of the original keys (the extended keys hold each key at most once per query), so the method
returns its log-sum-exp (``return_lse=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.kernels import flex
from attnzoo.kernels.block_sparse import selected_attention
from attnzoo.kernels.blockwise import grouped_logits
from attnzoo.kernels.selection import BlockSelection, block_means, threshold_blocks, topk_blocks
from attnzoo.masks.core import causal as causal_mod
from attnzoo.methods.common import Output, masked_attention, visible
from attnzoo.registry import SELF_PATTERNS, Backend, Call, MethodSpec, Param, TestHints, register


@dataclass(frozen=True)
class PermutedSelection:
    """What PBS-Attn selects: the key permutation and the block selection over the permuted keys.

    ``order (B, Hkv, Skv)`` int64: the original index of the key at each permuted position (one permutation per KV
    head). ``selection``: a :class:`~attnzoo.kernels.selection.BlockSelection` with one selection per query head,
    ``block_q = block_k = block_size``, whose key blocks are blocks of the permuted keys ``k.gather(2, order)``.
    """

    order: torch.Tensor
    selection: BlockSelection
    segment_size: int

    def dense(self, heads: int) -> torch.Tensor:
        """Block-level visibility in *original* key positions, ``(B, heads, Sq, Skv)`` bool (O(N²), for the
        reference); AND the causal mask for a causal call."""
        permuted = self.selection.dense(heads)
        order = self.order.repeat_interleave(heads // self.order.shape[1], dim=1).unsqueeze(2)
        return torch.zeros_like(permuted).scatter_(3, order.expand_as(permuted), permuted)

    def density(self) -> float:
        """The fraction of (query, key) pairs inside selected blocks (the causal mask not taken into account)."""
        return self.selection.density()


def _check_segment(segment_size: int, call: Call) -> str | None:
    block = call.params.get("block_size", 128)
    if isinstance(block, int) and block > 0 and segment_size % block:
        return f"a multiple of block_size {block}"
    return None


def _check_top_k(top_k: int, call: Call) -> str | None:
    blocks = -(-call.seq_kv // int(call.params.get("block_size", 128)))
    if top_k <= blocks:
        return None
    return f"at most the number of key blocks, ⌈seq_kv {call.seq_kv} / block_size⌉ = {blocks}"


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=generator))

    block = draw(1, 6)
    nk = -(-call.seq_kv // block)
    params: dict[str, Any] = {"block_size": block, "segment_size": block * draw(1, 3), "sink": bool(draw(0, 1))}
    if draw(0, 1):
        params["top_k"] = draw(1, nk)
    else:
        params["threshold"] = (0.5, 0.9, 1.0)[draw(0, 2)]
    return params


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """Blocks of ``seq_kv / 64`` (at least 1), segments of two blocks (the paper's 128/256 ratio), and ``top_k`` such
    that, with the diagonal segment's two blocks, a late query reads about ``fraction`` of the key blocks."""
    block_size = max(1, call.seq_kv // 64)
    blocks = -(-call.seq_kv // block_size)
    return {"block_size": block_size, "segment_size": 2 * block_size,
            "top_k": max(1, round(fraction * blocks) - 2)}


SPEC = MethodSpec(
    name="pbs",
    family="sparse",
    mechanism="D3",
    paper="Sparser Block-Sparse Attention via Token Permutation",
    arxiv="2510.21270",
    summary="keys permuted inside segments by the last query block's attention, then block-sparse attention over the "
            "blocks whose pooled score mass reaches a threshold, plus the diagonal segment; causal by original "
            "position",
    exact=False,
    patterns=SELF_PATTERNS,
    params=(
        Param("block_size", (int,), 128, "tokens per query and key block (the last may be partial)", low=1),
        Param("segment_size", (int,), 256, "tokens per permutation segment (a multiple of block_size)", low=1,
              check=_check_segment),
        Param("threshold", (float,), 0.9, "block score mass to reach among the other segments' blocks (1: all)",
              low=0.0, low_open=True, high=1.0),
        Param("top_k", (int,), None, "instead of threshold: this many best blocks of the other segments", low=1,
              check=_check_top_k),
        Param("sink", (bool,), True, "always select the block holding the first key (the attention sink)"),
    ),
    complexity="O(density·N²·d + N²d/block_size² + N·block_size·d) time (attention + block scores + permutation), "
               "O(N·d + (N/block_size)²) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
    lse=True,
)


def permutation(q: torch.Tensor, k: torch.Tensor, *, block_size: int, segment_size: int,
                scale: float) -> torch.Tensor:
    """PBS-Attn's query-aware key permutation: ``(B, Hkv, Skv)`` int64, the original index of the key at each
    permuted position. Each complete segment of keys is sorted by the mean attention the last ``block_size``
    queries (of every query head of the KV group) pay them, highest first (ties: original order); a trailing partial
    segment keeps its order."""
    b, hkv, skv = k.shape[0], k.shape[1], k.shape[2]
    order = torch.arange(skv, device=k.device).expand(b, hkv, skv).clone()
    complete = (skv // segment_size) * segment_size
    if complete == 0:
        return order
    last = q[:, :, -block_size:].detach().float().contiguous()
    probs = torch.softmax(grouped_logits(last, k[:, :, :complete].detach().float().contiguous(), scale), dim=-1)
    importance = probs.view(b, hkv, -1, complete).mean(dim=2)  # (B, Hkv, complete)
    ranked = importance.view(b, hkv, -1, segment_size).argsort(dim=-1, descending=True, stable=True)
    starts = torch.arange(0, complete, segment_size, device=k.device).view(1, 1, -1, 1)
    order[..., :complete] = (ranked + starts).view(b, hkv, complete)
    return order


def permute(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x (B, Hkv, S, D)`` with its rows reordered by ``order (B, Hkv, ≤S)``: row ``t`` is
    ``x[..., order[..., t], :]``."""
    b, h = order.shape[:2]
    return x[torch.arange(b, device=x.device).view(b, 1, 1), torch.arange(h, device=x.device).view(1, h, 1), order]


def _segment_blocks(n_blocks: int, per_segment: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n_blocks, device=device) // per_segment


def select(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float, block_size: int, segment_size: int,
           threshold: float = 0.9, top_k: int | None = None, sink: bool = True) -> PermutedSelection:
    """The permutation and the blocks each query block sees (steps 1–2 of the module docstring), computed in float32
    from detached inputs (the same selection whatever the inputs' dtype)."""
    h, n = q.shape[1], q.shape[2]
    order = permutation(q, k, block_size=block_size, segment_size=segment_size, scale=scale)
    k_perm = permute(k.detach().float(), order)
    scores = grouped_logits(block_means(q.detach().float().contiguous(), block_size),
                            block_means(k_perm, block_size), scale)  # (B, H, Nq, Nk)
    nb = scores.shape[-1]
    segment = _segment_blocks(nb, segment_size // block_size, q.device)
    diagonal = segment.unsqueeze(1) == segment.unsqueeze(0)  # (Nq, Nk); Nq == Nk in self-attention
    others = segment.unsqueeze(0) < segment.unsqueeze(1) if causal else ~diagonal
    sizes = {"causal": False, "seq_q": n, "seq_kv": n, "block_q": block_size, "block_k": block_size}
    candidates = scores.masked_fill(~others, float("-inf"))
    if top_k is not None:
        picked = topk_blocks(candidates, top_k, **sizes).blocks()
    elif threshold >= 1:
        picked = others.expand_as(scores)
    else:
        picked = threshold_blocks(candidates, threshold, **sizes).blocks()
    blocks = (picked & others) | diagonal
    if sink:
        first = (order == 0).float().argmax(dim=-1) // block_size  # (B, Hkv): the block holding original key 0
        hit = torch.nn.functional.one_hot(first, nb).bool().repeat_interleave(h // k.shape[1], dim=1)
        blocks = blocks | hit.unsqueeze(2)
    selection = BlockSelection.from_blocks(blocks, block_q=block_size, block_k=block_size, seq_q=n, seq_kv=n)
    return PermutedSelection(order, selection, segment_size)


def extended(plan: PermutedSelection, k: torch.Tensor, v: torch.Tensor, causal: bool
             ) -> tuple[torch.Tensor, torch.Tensor, BlockSelection]:
    """The keys, values and selection the fast paths attend with (module docstring): noncausal, the permuted keys
    and the selection as it is; causal, ``[π(K)[:L] ; K]`` with the past segments' blocks in the first part and the
    diagonal segment's blocks up to the query's own block in the second (``seq_kv = L + N``)."""
    order, sel = plan.order, plan.selection
    if not causal:
        return permute(k, order), permute(v, order), sel
    n, block = sel.seq_kv, sel.block_k
    per_segment = plan.segment_size // block
    nb = sel.num_kv_blocks
    past_blocks = ((nb - 1) // per_segment) * per_segment  # blocks of the segments before the last one
    length = past_blocks * block
    segment = _segment_blocks(nb, per_segment, k.device)
    blocks = sel.blocks()
    own = (segment.unsqueeze(1) == segment.unsqueeze(0)) & torch.ones(nb, nb, dtype=torch.bool,
                                                                      device=k.device).tril()
    past = blocks[..., :past_blocks] & (segment[:past_blocks].unsqueeze(0) < segment.unsqueeze(1))
    wide = torch.cat([past, own.expand(*blocks.shape[:2], nb, nb)], dim=-1)
    ext = BlockSelection.from_blocks(wide, block_q=block, block_k=block, seq_q=n, seq_kv=length + n)
    head = order[..., :length]
    return torch.cat([permute(k, head), k], dim=2), torch.cat([permute(v, head), v], dim=2), ext


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
              mask: torch.Tensor | None, bias: torch.Tensor | None, return_lse: bool = False, **params: Any) -> Output:
    """Dense: :func:`select`'s blocks in original key positions AND causal, then a masked softmax (``params``: the
    spec's ``block_size, segment_size, threshold, top_k, sink``)."""
    seen = select(q, k, causal=causal, scale=scale, **params).dense(q.shape[1]) & visible(causal, None, q, k)
    return masked_attention(q, k, v, seen, scale, mask, bias, return_lse)


def torch_permuted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                   mask: torch.Tensor | None, bias: torch.Tensor | None, return_lse: bool = False,
                   **params: Any) -> Output:
    """:func:`select`, the extended keys (:func:`extended`), the shared block-sparse kernel."""
    kx, vx, sel = extended(select(q, k, causal=causal, scale=scale, **params), k, v, causal)
    return selected_attention(q, kx, vx, sel, scale=scale, causal=causal, return_lse=return_lse)


def flex_permuted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                  mask: torch.Tensor | None, bias: torch.Tensor | None, return_lse: bool = False,
                  **params: Any) -> Output:
    """FlexAttention over the extended keys with the selection's block mask (causal predicate inside blocks)."""
    kx, vx, sel = extended(select(q, k, causal=causal, scale=scale, **params), k, v, causal)
    mod = causal_mod(q.shape[2], kx.shape[2]) if causal else None
    return flex.attention(q, kx, vx, scale=scale, block_mask=sel.block_mask(q.shape[1], mask_mod=mod),
                          return_lse=return_lse)


register(SPEC, reference, [Backend("torch", torch_permuted, lse=True),
                           Backend("flex", flex_permuted, flex.unavailable_masked, lse=True)])
