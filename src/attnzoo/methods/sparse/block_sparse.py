"""D0 — block-sparse attention over a given selection: the attend half of every D-family method, for users who bring
their own selection rule.

Not a paper's method but the layout the D-family papers and kernels share (FlexAttention's
``BlockMask.from_kv_blocks``, flash-attention's block-sparse kernels, MInference, MoBA, NSA): a
:class:`~attnzoo.kernels.selection.BlockSelection` says, per ``(batch, selection head, query block)``, which key blocks
are seen. Cited for the layout: "MoBA: Mixture of Block Attention for Long-Context LLMs" (arXiv:2502.13189).

Formula as implemented: ``O_i = Σ_{j visible} softmax_j(scale · q_i·k_j + bias_ij) v_j`` where key ``j`` is visible to
query ``i`` iff ``j``'s key block is in the selection of ``i``'s query block (for ``i``'s head: query head ``h`` reads
selection head ``h // (H / Hs)``), AND ``j ≤ i + Skv − Sq`` when causal (token level, inside the selected blocks),
AND the user mask. Rows that see no key give 0. ``selection`` is required (no default); it must match q/k (batch,
heads dividing, ``seq_q``/``seq_kv``, ``⌈seq_q / block_q⌉`` query blocks), else an error names ``selection``.

Fast path ``torch`` (:func:`torch_gathered`): :func:`attnzoo.kernels.block_sparse.selected_attention` — units
(batch, head, query block) grouped on the device by their number of selected blocks, each group's key blocks gathered
and attended with one batched fused-attention call per bounded chunk (CPU flash kernel forward and backward from the
saved log-sum-exp; elsewhere SDPA with checkpointed chunks); time ``O(density · N² · d)``, no dense scores.
The output is one softmax over a set of the original keys per query, so the method returns its log-sum-exp
(``return_lse=True``; the kernel's, which it computes anyway).
Fast path ``flex`` (:func:`flex_block_mask`): FlexAttention with ``selection.block_mask(H)`` (the causal predicate
inside the selected blocks when causal); forward only on CPU; no user mask or bias.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels import flex
from attnzoo.kernels.block_sparse import selected_attention
from attnzoo.kernels.selection import BlockSelection
from attnzoo.masks.core import causal as causal_mod
from attnzoo.methods.common import Output, masked_attention, visible
from attnzoo.registry import ALL_PATTERNS, Backend, Call, MethodSpec, Param, TestHints, register


def _check_selection(value: BlockSelection, call: Call) -> str | None:
    return value.mismatch(call.batch, call.heads, call.kv_heads, call.seq_q, call.seq_kv)


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    """A random selection. Test-sized calls (under 256 tokens): block sizes 1–8, one selection per query head, per KV
    head or shared, about a third to all of the blocks (some rows empty). Benchmark-sized calls: blocks of 64 at a
    quarter of the blocks, per query head (what a dynamic method selects; tiny blocks would time the bookkeeping)."""
    def pick(options: tuple[Any, ...]) -> Any:
        return options[int(torch.randint(0, len(options), (1,), generator=generator))]

    if min(call.seq_q, call.seq_kv) >= 256:
        block_q = block_k = 64
        heads, density = call.heads, 0.25
    else:
        block_q, block_k = pick((1, 2, 3, 8)), pick((1, 2, 4, 5))
        heads, density = pick((1, call.kv_heads, call.heads)), pick((0.35, 0.7, 1.0))
    nq, nk = -(-call.seq_q // block_q), -(-call.seq_kv // block_k)
    blocks = torch.rand(call.batch, heads, nq, nk, generator=generator) < density
    return {"selection": BlockSelection.from_blocks(blocks, block_q=block_q, block_k=block_k, seq_q=call.seq_q,
                                                    seq_kv=call.seq_kv)}


SPEC = MethodSpec(
    name="block_sparse",
    family="sparse",
    mechanism="D0",
    paper="MoBA: Mixture of Block Attention for Long-Context LLMs (the shared block layout)",
    arxiv="2502.13189",
    summary="exact softmax over the key blocks a given BlockSelection picks per (batch, head, query block); causal "
            "inside blocks; the attend kernel of the D family",
    exact=True,
    patterns=ALL_PATTERNS,
    params=(
        Param("selection", (BlockSelection,), None, "the key blocks each (batch, head, query block) sees "
              "(attnzoo.kernels.selection.BlockSelection; required)", check=_check_selection, required=True),
    ),
    complexity="O(density·N²·d) time, O(N·d) memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
    lse=True,
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, selection: BlockSelection, return_lse: bool = False,
) -> Output:
    seen = selection.dense(q.shape[1]).to(q.device) & visible(causal, None, q, k)
    return masked_attention(q, k, v, seen, scale, mask, bias, return_lse)


def torch_gathered(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, selection: BlockSelection, return_lse: bool = False,
) -> Output:
    return selected_attention(q, k, v, selection, scale=scale, causal=causal, mask=mask, bias=bias,
                              return_lse=return_lse)


def flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, selection: BlockSelection, return_lse: bool = False,
) -> Output:
    mod = causal_mod(q.shape[2], k.shape[2]) if causal else None
    block_mask = selection.to(q.device).block_mask(q.shape[1], mask_mod=mod)
    return flex.attention(q, k, v, scale=scale, block_mask=block_mask, return_lse=return_lse)


register(SPEC, reference, [Backend("torch", torch_gathered, lse=True),
                           Backend("flex", flex_block_mask, flex.unavailable_masked, lse=True)])
