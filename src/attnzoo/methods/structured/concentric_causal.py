"""P13 — concentric causal attention (CCA): 2-D visual tokens ordered by concentric rings, causal in ring order.

Paper: "Mitigating Object Hallucination via Concentric Causal Attention" (Xing et al., arXiv:2410.15926). Used the
paper's description and the authors' public code (cca-llava) for the exact definition; the code here is written anew.

Formula as implemented: the sequence is ``image_start`` text tokens, an ``(h, w) = layout`` image in row-major order,
then text tokens up to the end. Every token gets a concentric position id ``p``
(:func:`attnzoo.masks.positional.concentric_position_ids`): text before the image counts ``0, 1, …``; visual token
``(y, x)`` gets ``image_start + min(y, x, h−1−y, w−1−x)`` (outer ring first, centre last, so the centre sits next to
the instruction text); text after the image continues at ``image_start + ceil(min(h, w)/2)``. Query ``i`` attends with
softmax to the keys ``j`` with ``p_j ≤ p_i`` (AND the user mask), ``s = scale · q·k + bias``: plain causal attention
for text, and inside the image each ring sees itself and every outer ring. ``layout=None`` means a text-only sequence
(ordinary causal attention), as in the authors' code. The same position ids are what the paper feeds to RoPE: apply
them to q and k before calling (this function takes q and k as given). Self-attention with ``causal=True`` only (the
mask is a causal mask); GQA supported.

Fast path ``torch`` (:func:`torch_sorted_blocks`): tokens are stably sorted by position id (a cached permutation), which
makes the mask "causal with ties": sorted query ``i`` sees the key prefix ``[0, end_i)``. The text before the image is
one causal SDPA; each ring (in pieces of ``BLOCK`` rows) is one SDPA without any mask over the keys up to the ring's
end, since all its rows see the same keys; the text after the image runs in blocks of ``BLOCK`` rows over their key
prefix with a cached lower-triangular tile zero-padded on the left. With a user mask or bias every segment builds its
own mask rows. Segments are checkpointed under autograd and write their rows straight to the un-permuted output: about
half the dense FLOPs, never the ``N × N`` mask. ``flex`` (:func:`flex_block_mask`): the predicate's cached block mask
(:func:`attnzoo.masks.positional.position_causal`).

Decoding (:data:`DECODER`): inside the image a token sees image tokens that come *after* it in row-major order (an
outer-ring token at the bottom of the image is visible to the centre), so an image token's output depends on tokens
a decoder has not seen yet. Decoding therefore requires the whole image inside the prompt (``image_start + h·w`` at
most every sequence's prompt length; otherwise an error names ``layout`` or ``lengths``); the text after it is
causal in token order and decodes exactly. :func:`decode_prefill` runs :func:`torch_sorted_blocks` over the prompt
(ragged padding gets position ids above every real token's, so no real query sees it); :func:`decode_step` appends
the token and attends over the slots that the forward's predicate, on the concentric position ids of the slots'
positions, shows it (every earlier token, once past the image: SDPA without a mask).

Log-sum-exp (``return_lse=True``): the output is one softmax over the keys of lower or equal position id, so each
row's log-sum-exp is returned: every segment runs :func:`attnzoo.kernels.dense.attention_lse` (with its own mask
rows) instead of SDPA, and the log-sum-exp rows go to their un-permuted places like the output's (FlexAttention's
own on GPU).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnzoo import masks
from attnzoo.errors import fail
from attnzoo.kernels import flex
from attnzoo.kernels.dense import attention_lse
from attnzoo.kv.attend import masked_step
from attnzoo.kv.cache import KVCache
from attnzoo.masks.positional import concentric_position_ids, position_causal
from attnzoo.methods.common import Output, mask_reference
from attnzoo.registry import Backend, Call, Decoder, MethodSpec, Param, TestHints, register

BLOCK = 128


def _check_layout(value: Any, call: Call) -> str | None:
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)):
        return "a tuple (h, w) of two positive ints: the image's token grid"
    start = call.params.get("image_start", 0)
    if isinstance(start, int) and start >= 0 and start + value[0] * value[1] > call.length:
        return f"an image of at most {call.length - start} tokens (seq {call.length} minus image_start {start})"
    return None


def _check_start(value: Any, call: Call) -> str | None:
    if call.params.get("layout") is None and value > call.length:
        return f"at most the sequence length {call.seq_q}"
    return None


def _sample_params(call: Call, generator: torch.Generator) -> dict[str, Any]:
    n = call.seq_q

    def pick(high: int) -> int:
        return int(torch.randint(0, high + 1, (1,), generator=generator))

    h = 1 + pick(min(n, 9) - 1)
    w = 1 + pick(min(n // h, 9) - 1)
    return {"layout": (h, w), "image_start": pick(n - h * w)}


def _decoding_params(call: Call, params: dict[str, Any], prompt: int) -> dict[str, Any]:
    """The sampled image, shrunk to fit in a prompt of ``prompt`` tokens (decoding needs the whole image in it)."""
    h, w = params["layout"]
    h, w = min(h, 2), min(w, prompt // 2)
    return {"layout": (h, w), "image_start": min(params["image_start"], prompt - h * w)}


SPEC = MethodSpec(
    name="concentric_causal",
    family="structured",
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
    tests=TestHints(sample_params=_sample_params, decoding_params=_decoding_params),
    lse=True,
)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, image_start: int, return_lse: bool = False,
) -> Output:
    pos = concentric_position_ids(q.shape[2], layout, image_start, q.device)
    return mask_reference(q, k, v, position_causal(pos, pos), scale, mask, bias, return_lse)


class _Plan:
    """A configuration's token order and its query segments.

    ``order`` stably sorts tokens by position id (text before the image, the image ring by ring from the border in,
    text after it) and sorted query ``i`` sees keys ``< ends[i]``. ``segments`` are
    ``(start, stop, reach, kind)``: queries ``[start, stop)`` see keys below ``reach`` at most, and

    - ``"causal"``: the text before the image, plain causal attention among itself;
    - ``"full"``: a piece of one ring, whose rows all see exactly the keys ``[0, reach)`` (no mask);
    - ``"masked"``: a block of the text after the image, which needs its lower-triangular diagonal tile.
    """

    def __init__(self, n: int, layout: tuple[int, int] | None, image_start: int) -> None:
        pos = concentric_position_ids(n, layout, image_start)
        ordered, self.order = torch.sort(pos, stable=True)
        self.ends = torch.searchsorted(ordered, ordered, right=True)
        text = n if layout is None else image_start
        image_end = text if layout is None else text + layout[0] * layout[1]
        self.segments: list[tuple[int, int, int, str]] = [(0, text, text, "causal")] if text else []
        ring_ends = sorted(set(self.ends[text:image_end].tolist()))
        for a, b in zip([text, *ring_ends[:-1]][: len(ring_ends)], ring_ends, strict=True):
            self.segments += [(s, min(s + BLOCK, b), b, "full") for s in range(a, b, BLOCK)]
        self.segments += [(s, min(s + BLOCK, n), min(s + BLOCK, n), "masked") for s in range(image_end, n, BLOCK)]
        self._tiles: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def additive(self, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A "masked" block's mask as 0 / −inf logits over keys ``[0, stop)``: its causal tile, zero-padded left."""
        key = (device, dtype)
        if key not in self._tiles:
            tri = torch.ones(BLOCK, BLOCK, dtype=torch.bool, device=device).tril()
            self._tiles[key] = torch.zeros(BLOCK, BLOCK, dtype=dtype, device=device).masked_fill_(~tri, float("-inf"))
        rows = stop - start
        return F.pad(self._tiles[key][:rows, :rows], (start, 0))


@lru_cache(maxsize=32)
def _plan(n: int, layout: tuple[int, int] | None, image_start: int) -> _Plan:
    return _Plan(n, layout, image_start)


def torch_sorted_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, image_start: int, return_lse: bool = False,
) -> Output:
    dev = q.device
    plan = _plan(q.shape[2], layout, image_start)
    order, ends = plan.order.to(dev), plan.ends.to(dev)
    qs, ks, vs = q[:, :, order], k[:, :, order], v[:, :, order]
    gqa = q.shape[1] != k.shape[1]
    general = mask is not None or bias is not None

    def segment(q_rows: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, start: int, stop: int, reach: int,
                kind: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        kr, vr = ks[:, :, :reach], vs[:, :, :reach]
        if not general:
            attn = plan.additive(start, stop, dev, q.dtype) if kind == "masked" else None
            if return_lse:
                return attention_lse(q_rows, kr, vr, causal=kind == "causal", scale=scale, mask=None, bias=attn)
            return F.scaled_dot_product_attention(q_rows, kr, vr, attn_mask=attn, is_causal=kind == "causal",
                                                  scale=scale, enable_gqa=gqa)
        seen = torch.arange(reach, device=dev) < ends[start:stop].unsqueeze(1)
        if mask is not None:
            seen = seen & masks.pairs(mask, order[start:stop], order[:reach])
        if return_lse:
            rows_bias = None if bias is None else masks.pairs(bias, order[start:stop], order[:reach])
            return attention_lse(q_rows, kr, vr, causal=False, scale=scale, bias=rows_bias,
                                 mask=seen.view(1, 1, *seen.shape) if seen.dim() == 2 else seen)
        some = seen.any(dim=-1, keepdim=True)
        attn = torch.zeros(seen.shape, dtype=q.dtype, device=dev).masked_fill_(~seen & some, float("-inf"))
        if bias is not None:
            attn = attn + masks.pairs(bias, order[start:stop], order[:reach])
        out = F.scaled_dot_product_attention(q_rows, kr, vr, attn_mask=attn, scale=scale, enable_gqa=gqa)
        return out * some.to(out.dtype)

    # Under autograd each segment is recomputed in the backward pass, so no segment's mask outlives it.
    recompute = torch.is_grad_enabled() and len(plan.segments) > 1
    # (B, N, H, Dv) storage, the layout CPU SDPA returns its output in: each segment's rows are copied straight to
    # their un-permuted places as whole (H, Dv) slabs.
    out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])
    lse = q.new_empty(out.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32)) if return_lse else None
    for a, b, r, kind in plan.segments:
        seg = (checkpoint(segment, qs[:, :, a:b], ks, vs, a, b, r, kind, use_reentrant=False) if recompute
               else segment(qs[:, :, a:b], ks, vs, a, b, r, kind))
        if lse is not None:
            seg, seg_lse = seg
            lse.index_copy_(1, order[a:b], seg_lse.transpose(1, 2).to(lse.dtype))
        out.index_copy_(1, order[a:b], seg.transpose(1, 2))
    return out.transpose(1, 2) if lse is None else (out.transpose(1, 2), lse.transpose(1, 2))


def flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: Any, image_start: int, return_lse: bool = False,
) -> Output:
    n = q.shape[2]
    pos = concentric_position_ids(n, layout, image_start, q.device)
    return flex.mask_attention(q, k, v, scale=scale, key=("concentric_causal", n, layout, image_start),
                               mod=position_causal(pos, pos), return_lse=return_lse)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, layout: Any, image_start: int,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Concentric causal attention over a (right-padded) prompt that holds the whole image; the cache of its keys."""
    cache = KVCache.from_prompt(k, v, lengths)
    if layout is not None and bool((cache.length < image_start + layout[0] * layout[1]).any()):
        raise fail("lengths", f"prompts holding the whole image (at least {image_start + layout[0] * layout[1]} "
                   "tokens: image tokens see later image tokens, which decoding cannot)", cache.length.tolist())
    out = torch_sorted_blocks(q, k, v, causal=True, scale=scale, mask=None, bias=None, layout=layout,
                              image_start=image_start)
    return out, cache


def decode_step(
    cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, layout: Any,
    image_start: int,
) -> tuple[torch.Tensor, KVCache]:
    """One token per sequence (after the image): append, attend over the slots of lower or equal position ids."""
    pos = concentric_position_ids(int(cache.length.max()) + 1, layout, image_start, q.device)
    return masked_step(cache, q, k, v, scale, position_causal(pos, pos))


DECODER = Decoder(decode_prefill, decode_step, kv_cache=True)

register(SPEC, reference, [Backend("torch", torch_sorted_blocks, lse=True),
                           Backend("flex", flex_block_mask, flex.unavailable_masked, lse=True)], DECODER)
