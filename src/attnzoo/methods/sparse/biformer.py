"""D2 — BiFormer: bi-level routing attention, each region of a 2-D grid routed to its top-k regions.

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention" (Zhu et al., CVPR 2023, arXiv:2303.08125);
reference code github.com/rayleizhu/BiFormer (``ops/bra_legacy.py``: ``TopkRouting``, ``KVGather``,
``BiLevelRoutingAttention``).

Formula as implemented (noncausal self-attention, the paper's only pattern): the sequence is a row-major grid of shape
``layout`` (BiFormer's ``H × W`` feature map; any number of axes works, ``None`` means ``(seq,)``) cut into regions
of ``region`` tokens per axis (``T = Π region`` tokens each, ``R = Π layout / region`` regions, numbered row-major
over the grid of regions). Per query head ``h`` the region-level query and key are the means of the region's
queries and keys, ``Q_r = mean_{i∈r} q_i``, ``K_r = mean_{j∈r} k_j`` (the key head of ``h``'s GQA group), and the
region affinity is ``A^h = Q_r K_rᵀ`` (``R × R``). BiFormer computes ``A`` once for all heads, from the means of the
whole multi-head query and key vectors: that dot product is the sum over heads of the per-head ones, so
``routing="shared"`` (the default, the paper's) uses ``A = Σ_h A^h``; ``routing="group"`` sums over each GQA group's
query heads only (one routing per KV head, the K/V gather then happens once per group, as NSA shares its selection);
``routing="head"`` routes every query head by its own ``A^h``. Each query region ``r`` keeps the ``top_k`` regions
of largest affinity, ``I_r = topk(A[r])`` (:func:`attnzoo.kernels.selection.topk_blocks`; its own region is not
forced, as in BiFormer; ties broken by ``torch.topk``), and each of its queries attends with one softmax to the
tokens of the union of those regions::

    O_i = softmax_{j : region(j) ∈ I_region(i)} (scale · q_i·k_j) V

The affinity is unscaled (BiFormer multiplies by ``qk_scale`` before its top-k, which cannot change the order) and
computed in float32 from detached inputs (BiFormer's default ``diff_routing=False`` detaches it too): no gradient
flows through the routing, as in the paper's models.

Regions as blocks: the tokens are permuted to region-major order (:func:`region_order`: region after region, each
region's tokens row-major inside it), where every region is a contiguous block of ``T`` tokens. :func:`select`
returns the routing as a :class:`~attnzoo.kernels.selection.BlockSelection` over that order (``block_q = block_k =
T``; query block ``r`` is region ``r``, ``indices (B, Hs, R, top_k)``, ``Hs`` = 1, the KV heads or the query heads
for ``routing`` shared/group/head), which users can inspect, plot and reuse with the ``block_sparse`` method on
region-major tensors.

Defaults ``region=8, top_k=4``: 8×8-token regions on a 2-D layout, BiFormer's first stage at 224² input (a 56×56
map with ``n_win=7`` regions per side; its ``n_win`` is ``layout / region``), and ``top_k=4``, its second stage
(stages use 1, 4, 16, then full attention). ``region`` must divide every axis of the layout, else the library's error
names ``region``: BiFormer asserts the same, and its ``auto_pad`` option (segmentation) pads the map instead — pad
the grid and pass a key mask to get that. ``top_k`` larger than the number of regions raises.

Not included, and why: BiFormer's LCE (local context enhancement: a learned depthwise convolution of V over the 2-D
map, ``side_dwconv``, added to the attention output) has weights and is a separate branch of the layer, not part of
the attention mechanism: add ``dwconv(V)`` to this method's output in the layer. Its key/value downsampling options
(``kv_downsample_mode``; the released models use ``identity``), ``param_routing`` (a learned linear before routing)
and ``soft_routing`` (values scaled by the routing softmax) are off in the released models and left out. Only the
``self/noncausal`` pattern: BiFormer is a vision backbone with no causal form (so no decoder), and cross-attention
would need a second grid for the keys, which the paper never uses.

Reference (:func:`reference`): the selection of :func:`select` on the same inputs expanded to a dense token mask in
the original order (query ``i`` sees key ``j`` iff ``j``'s region is routed from ``i``'s), AND the user mask, then a
dense masked softmax. Fast path ``torch`` (:func:`torch_routed`): :func:`select`, one gather of q, k, v into
region-major order, :func:`attnzoo.kernels.block_sparse.selected_attention` (the D family's attend kernel: each
region's queries against the ``top_k·T`` gathered keys of its regions, CPU flash kernel, autograd), one gather back:
time ``O(N·top_k·T·d + R²·d)``, memory ``O(N·d)``. A user mask/bias is permuted the same way (rows and columns) and
handed to the kernel. Fast path ``flex`` (:func:`flex_routed`): the same permutation, FlexAttention with the
selection's block mask (:meth:`BlockSelection.block_mask`). The output is one softmax over the keys of the routed
regions, so the method returns its log-sum-exp (``return_lse=True``, from the reference and ``torch``, in token
order).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo.kernels import flex
from attnzoo.kernels.block_sparse import selected_attention
from attnzoo.kernels.blockwise import grouped_logits
from attnzoo.kernels.selection import BlockSelection, group_scores, topk_blocks
from attnzoo.methods.checks import check_layout, divides_layout, layout_and_sizes, layout_shape, per_axis_ints
from attnzoo.methods.common import Output, masked_attention
from attnzoo.registry import Backend, Call, MethodSpec, Param, TestHints, register

ROUTINGS = ("shared", "group", "head")
REGION = 8  # the default region side (BiFormer's 8×8-token regions)
TOP_K = 4


def _regions(call: Call) -> int | None:
    """The number of regions of a call, or None while its layout or region is invalid (their checks report it)."""
    layout = call.params.get("layout")
    region = per_axis_ints("region", call.params.get("region", REGION), call, 1)
    if check_layout(layout, call) is not None or isinstance(region, str) or not region:
        return None
    shape = layout_shape(call.seq_q, layout)
    if any(n % r for n, r in zip(shape, region, strict=True)):
        return None
    return math.prod(n // r for n, r in zip(shape, region, strict=True))


def _check_top_k(value: int, call: Call) -> str | None:
    regions = _regions(call)
    if regions is not None and value > regions:
        return f"at most the number of regions ({regions})"
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    """A random 2-D (or, one time in three, 1-D) layout of the sequence, regions of random divisors of its axes, a
    random routing and ``top_k``."""
    def pick(options: list[Any]) -> Any:
        return options[int(torch.randint(0, len(options), (), generator=generator))]

    n = call.seq_q
    rows = pick(_divisors(n))
    layout = None if int(torch.randint(0, 3, (), generator=generator)) == 0 else (rows, n // rows)
    region = tuple(pick(_divisors(a)) for a in (layout or (n,)))
    regions = math.prod(a // r for a, r in zip(layout or (n,), region, strict=True))
    return {"layout": layout, "region": region if layout else region[0], "top_k": pick(list(range(1, regions + 1))),
            "routing": pick(list(ROUTINGS))}


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """Parameters that make every query read about ``fraction`` of the keys: the call's layout (else the squarest
    2-D grid of the sequence, BiFormer's setting), its region (else per axis the largest divisor of the axis up to
    ``64^(1/axes)``: 8×8-token regions on a 2-D grid), and ``top_k = max(1, round(fraction · regions))``."""
    layout = call.params.get("layout")
    if layout is None:
        rows = max(d for d in _divisors(call.seq_q) if d * d <= call.seq_q)
        layout = (rows, call.seq_q // rows)
    side = round(64 ** (1 / len(layout)))
    region = call.params.get("region") or tuple(max(d for d in _divisors(a) if d <= side) for a in layout)
    shape, sizes = layout_and_sizes(call.seq_q, layout, region)
    regions = math.prod(a // r for a, r in zip(shape, sizes, strict=True))
    return {"layout": layout, "region": region, "top_k": min(regions, max(1, round(fraction * regions)))}


SPEC = MethodSpec(
    name="biformer",
    family="sparse",
    mechanism="D2",
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention",
    arxiv="2303.08125",
    summary="tokens on a grid cut into regions; each query region attends to the tokens of its top-k regions by "
            "mean(q)·mean(k) affinity",
    exact=False,
    patterns=frozenset({"self/noncausal"}),
    params=(
        Param("layout", (tuple,), None, "spatial shape of the sequence (BiFormer: (H, W)); None means (seq,)",
              check=check_layout),
        Param("region", (int, tuple), REGION, "tokens per region along each axis (int or tuple); must divide each "
              "axis of the layout", low=1, check=divides_layout("region")),
        Param("top_k", (int,), TOP_K, "regions each query region attends to (at most the number of regions)", low=1,
              check=_check_top_k),
        Param("routing", (str,), "shared", "one routing for all heads (BiFormer's), per KV group, or per head",
              choices=ROUTINGS),
    ),
    complexity="O(N·top_k·T·d + R²·d) time (T tokens per region, R regions), O(N·d) memory",
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
    lse=True,
)


def region_order(layout: tuple[int, ...], region: tuple[int, ...], device: torch.device | None = None
                 ) -> torch.Tensor:
    """``perm (N,)`` int64: the token (row-major index in ``layout``) at each position of the region-major order —
    regions row-major over the grid of regions, each region's tokens row-major inside it. ``x[:, :, perm]`` is the
    region-major sequence; region ``r`` is its positions ``[r·T, (r+1)·T)``."""
    sizes = [s for n, r in zip(layout, region, strict=True) for s in (n // r, r)]
    outer, inner = list(range(0, len(sizes), 2)), list(range(1, len(sizes), 2))
    return torch.arange(math.prod(layout), device=device).view(sizes).permute(*outer, *inner).flatten()


def region_means(x: torch.Tensor, layout: tuple[int, ...], region: tuple[int, ...]) -> torch.Tensor:
    """The mean of each region's rows of ``x (B, H, N, D)``: ``(B, H, R, D)``, regions row-major (no permutation)."""
    b, h, _, d = x.shape
    sizes = [s for n, r in zip(layout, region, strict=True) for s in (n // r, r)]
    inner = tuple(range(3, 2 + len(sizes), 2))  # the within-region axes of the (B, H, *sizes, D) view
    return x.reshape(b, h, *sizes, d).mean(dim=inner).reshape(b, h, -1, d)


def select(q: torch.Tensor, k: torch.Tensor, *, layout: tuple[int, ...] | None, region: int | tuple[int, ...],
           top_k: int, routing: str = "shared") -> BlockSelection:
    """BiFormer's routing: the ``top_k`` regions of largest ``mean(q)·mean(k)`` affinity per query region, as a
    :class:`BlockSelection` over the region-major order (:func:`region_order`), ``block_q = block_k`` = tokens per
    region, one selection for all heads, per KV head or per query head (``routing``)."""
    shape, sizes = layout_and_sizes(q.shape[2], layout, region)
    queries = region_means(q.detach().float(), shape, sizes)  # (B, H, R, D)
    keys = region_means(k.detach().float(), shape, sizes)  # (B, Hkv, R, D)
    affinity = grouped_logits(queries, keys, 1.0)  # (B, H, R, R)
    if routing != "head":
        affinity = group_scores(affinity, 1 if routing == "shared" else k.shape[1])
    tokens = math.prod(sizes)
    return topk_blocks(affinity, top_k, causal=False, seq_q=q.shape[2], seq_kv=k.shape[2], block_q=tokens,
                       block_k=tokens)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: tuple[int, ...] | None, region: int | tuple[int, ...], top_k: int,
    routing: str, return_lse: bool = False,
) -> Output:
    selection = select(q, k, layout=layout, region=region, top_k=top_k, routing=routing)
    shape, sizes = layout_and_sizes(q.shape[2], layout, region)
    # each token's region (row-major over the grid of regions), from its coordinates on the grid
    coords = torch.unravel_index(torch.arange(q.shape[2], device=q.device), shape)
    of = torch.zeros(q.shape[2], dtype=torch.long, device=q.device)
    for c, n, r in zip(coords, shape, sizes, strict=True):
        of = of * (n // r) + c // r
    routed = selection.blocks(q.shape[1]).to(q.device)  # (B, H, R, R)
    return masked_attention(q, k, v, routed[:, :, of][:, :, :, of], scale, mask, bias, return_lse)


def _permuted(x: torch.Tensor | None, perm: torch.Tensor) -> torch.Tensor | None:
    """A user mask/bias ``(B|1, H|1, N|1, N)`` with its query and key axes in region-major order."""
    if x is None:
        return None
    rows = x if x.shape[2] == 1 else x.index_select(2, perm)
    return rows.index_select(3, perm)


def _routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: tuple[int, ...] | None,
            region: int | tuple[int, ...], top_k: int, routing: str
            ) -> tuple[BlockSelection, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What both fast paths start with: the selection (:func:`select`), ``perm`` (:func:`region_order`) and q, k, v
    gathered into region-major order."""
    selection = select(q, k, layout=layout, region=region, top_k=top_k, routing=routing)
    perm = region_order(*layout_and_sizes(q.shape[2], layout, region), device=q.device)
    return selection, perm, q.index_select(2, perm), k.index_select(2, perm), v.index_select(2, perm)


def _in_token_order(out: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``out (B, H, N, ·)`` (or a log-sum-exp ``(B, H, N)``) from region-major back to the layout's row-major
    order."""
    return out.index_select(2, torch.argsort(perm))


def torch_routed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: tuple[int, ...] | None, region: int | tuple[int, ...], top_k: int,
    routing: str, return_lse: bool = False,
) -> Output:
    selection, perm, qp, kp, vp = _routed(q, k, v, layout, region, top_k, routing)
    out = selected_attention(qp, kp, vp, selection, scale=scale, causal=False, mask=_permuted(mask, perm),
                             bias=_permuted(bias, perm), return_lse=return_lse)
    if isinstance(out, tuple):
        return _in_token_order(out[0], perm), _in_token_order(out[1], perm)
    return _in_token_order(out, perm)


def flex_routed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, layout: tuple[int, ...] | None, region: int | tuple[int, ...], top_k: int,
    routing: str, return_lse: bool = False,
) -> Output:
    selection, perm, qp, kp, vp = _routed(q, k, v, layout, region, top_k, routing)
    out = flex.attention(qp, kp, vp, scale=scale, block_mask=selection.block_mask(q.shape[1]), return_lse=return_lse)
    if return_lse:
        return _in_token_order(out[0], perm), _in_token_order(out[1], perm)
    return _in_token_order(out, perm)


register(SPEC, reference, [Backend("torch", torch_routed, lse=True),
                           Backend("flex", flex_routed, flex.unavailable_masked, lse=True)])
