"""P13 — concentric causal attention (CCA): 2-D visual tokens ordered by concentric rings, causal in ring order.

Paper: "Mitigating Object Hallucination via Concentric Causal Attention" (Xing et al., arXiv:2410.15926). Used the
paper's description and the authors' public code (cca-llava) for the exact definition; the code here is written anew.

Formula as implemented: the sequence is ``image_start`` text tokens, an ``(h, w) = layout`` image in row-major order,
then text tokens up to the end. Every token gets a concentric position id ``p``
(:func:`attnzoo.masks_local_extra.concentric_position_ids`): text before the image counts ``0, 1, …``; visual token
``(y, x)`` gets ``image_start + min(y, x, h−1−y, w−1−x)`` (outer ring first, centre last, so the centre sits next to
the instruction text); text after the image continues at ``image_start + ceil(min(h, w)/2)``. Query ``i`` attends with
softmax to the keys ``j`` with ``p_j ≤ p_i`` (AND the user mask), ``s = scale · q·k + bias``: plain causal attention
for text, and inside the image each ring sees itself and every outer ring. ``layout=None`` means a text-only sequence
(ordinary causal attention), as in the authors' code. The same position ids are what the paper feeds to RoPE: apply
them to q and k before calling (this function takes q and k as given). Self-attention with ``causal=True`` only (the
mask is a causal mask); GQA supported.

Fast path ``torch``: tokens are stably sorted by position id (a cached permutation), which makes the mask "causal with
ties": sorted query ``i`` sees the key prefix ``[0, end_i)``, ``end`` non-decreasing. Query blocks of ``BLOCK`` rows run
one SDPA each over their key prefix only, with a ``BLOCK × prefix`` additive mask (checkpointed under autograd), and the
output is un-permuted: about half the dense FLOPs, never the ``N × N`` mask. ``flex``: the predicate's cached block
mask (:func:`attnzoo.masks_local_extra.position_causal`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo import masks
from attnzoo.kernels.blockwise import query_blocks
from attnzoo.masks_local_extra import concentric_position_ids, position_causal
from attnzoo.methods.common import dense_scores, repeat_kv, safe_softmax
from attnzoo.methods.local.common import flex_attention, flex_serves
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register

BLOCK = 128


def _check_layout(value: Any, call: Call) -> str | None:
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)):
        return "a tuple (h, w) of two positive ints: the image's token grid"
    start = call.params.get("image_start", 0)
    if isinstance(start, int) and start >= 0 and start + value[0] * value[1] > call.seq_q:
        return f"an image of at most {call.seq_q - start} tokens (seq {call.seq_q} minus image_start {start})"
    return None


def _check_start(value: Any, call: Call) -> str | None:
    if call.params.get("layout") is None and value > call.seq_q:
        return f"at most the sequence length {call.seq_q}"
    return None


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    n = call.seq_q

    def pick(high: int) -> int:
        return int(torch.randint(0, high + 1, (1,), generator=generator))

    h = 1 + pick(min(n, 9) - 1)
    w = 1 + pick(min(n // h, 9) - 1)
    return {"layout": (h, w), "image_start": pick(n - h * w)}


SPEC = MethodSpec(
    name="concentric_causal",
    family="local",
    mechanism="P13",
    paper="Mitigating Object Hallucination via Concentric Causal Attention",
    arxiv="2410.15926",
    summary="causal attention over concentric position ids: image rings outer to centre, then text",
    exact=True,
    patterns=frozenset({"self/causal"}),
    params=(
        Param("layout", (tuple,), None, "(h, w) token grid of the image; None: text only (plain causal)",
              check=_check_layout),
        Param("image_start", (int,), 0, "number of text tokens before the image", low=0, check=_check_start),
    ),
    complexity="O(N²·d/2) time, O(N·block) memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample_params),
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, image_start: int,
) -> torch.Tensor:
    b, h, n, _ = q.shape
    pos = concentric_position_ids(n, layout, image_start, q.device)
    seen = masks.dense(position_causal(pos, pos), b, h, n, n, q.device)
    if mask is not None:
        seen = seen & mask
    s = dense_scores(q, k, scale)
    if bias is not None:
        s = s + bias
    return safe_softmax(s, seen) @ repeat_kv(v, h)


@lru_cache(maxsize=32)
def _plan(n: int, layout: tuple[int, int] | None, image_start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``order`` (stable sort by position id), its inverse, and ``ends``: sorted query ``i`` sees keys ``< ends[i]``."""
    pos = concentric_position_ids(n, layout, image_start)
    ordered, order = torch.sort(pos, stable=True)
    ends = torch.searchsorted(ordered, ordered, right=True)
    return order, torch.argsort(order), ends


def sorted_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, image_start: int,
) -> torch.Tensor:
    n, dev = q.shape[2], q.device
    order, inverse, ends = (t.to(dev) for t in _plan(n, layout, image_start))
    ends_list = ends.tolist()
    qs, ks, vs = q[:, :, order], k[:, :, order], v[:, :, order]
    gqa = q.shape[1] != k.shape[1]

    def block(q_rows: torch.Tensor, start: int) -> torch.Tensor:
        stop = start + q_rows.shape[2]
        reach = ends_list[stop - 1]
        seen = torch.arange(reach, device=dev) < ends[start:stop].unsqueeze(1)  # (rows, reach)
        if mask is not None:
            seen = seen & _pairs(mask, order[start:stop], order[:reach])
        some = seen.any(dim=-1, keepdim=True)
        attn = torch.zeros(seen.shape, dtype=q.dtype, device=dev).masked_fill_(~seen & some, float("-inf"))
        if bias is not None:
            attn = attn + _pairs(bias, order[start:stop], order[:reach])
        out = F.scaled_dot_product_attention(q_rows, ks[:, :, :reach], vs[:, :, :reach], attn_mask=attn,
                                             scale=scale, enable_gqa=gqa)
        return out if mask is None else out * some.to(out.dtype)

    return query_blocks(block, qs, BLOCK)[:, :, inverse]


def _pairs(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A 4-D mask/bias view at the (row, col) pairs of a block, in sorted order (size-1 axes kept)."""
    t = t if t.shape[2] == 1 else t[:, :, rows]
    return t if t.shape[3] == 1 else t[:, :, :, cols]


def flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, image_start: int,
) -> torch.Tensor:
    n = q.shape[2]
    pos = concentric_position_ids(n, layout, image_start, q.device)
    return flex_attention(q, k, v, scale, ("concentric_causal", n, layout, image_start), position_causal(pos, pos))


register(SPEC, reference, [Backend("torch", sorted_blocks), Backend("flex", flex, flex_serves)])
