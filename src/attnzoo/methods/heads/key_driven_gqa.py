"""H2 — key-driven grouped-query attention (KDGQA, DGQA, PGQA): query heads allocated to KV groups by key norms.

Paper: "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention" (Khan, Khaquan, Tafveez, Samiwala,
Raza; arXiv:2408.08454), read with the authors' public code (zohaib-khan5040/key-driven-gqa; read in a public fork
with the same ``modules/attention/{kdgqa,dgqa,pgqa}.py``).

GQA gives each of the ``G`` KV heads the same number ``H / G`` of query heads. The paper lets the keys decide:

    n_g = Σ_b ‖K_{b,g}‖_F                (each KV head's key norm over its tokens and dims, summed over the batch)
    a_g = round(H · n̂_g / Σ n̂)          query heads given to KV head g, then fixed to sum to H

and query heads are dealt out in order: heads ``0 … a_0 − 1`` read KV head 0, the next ``a_1`` read KV head 1, and so
on. Each query head then runs softmax attention against its KV head:
``O_i = softmax(scale · q_i K_{g(i)}ᵀ + bias + M) V_{g(i)}``.

- KDGQA (:func:`key_norm_allocation`, ``allocation=None``): ``n̂`` is ``n`` min-max scaled to [0, 1] (so the
  smallest-norm group gets no query unless the rounding fix gives it one), recomputed on every forward pass;
- DGQA (the layer ``az.nn.KeyDrivenGQA``, :func:`dgqa_allocation`): the norms are tracked during training, by an
  exponential moving average ``m ← β n + (1 − β) m`` (β = 0.9 weighs the current batch, as the public code), and
  ``a ∝ m`` (variant ``"ema"``) or ``a ∝ |n − m_prev|`` (variant ``"diff"``: how far the norms moved), without
  min-max scaling (as the code); the kernel takes the resulting ``allocation``. The code stores
  ``(cache + n) / window`` as its tracked norms, which for its default window of 1 is a running *sum*; we keep the
  moving average itself, so the tracked value stays on the scale of one batch's norms;
- PGQA (:func:`perturbed`): uniform GQA groups, and each query head's attention output has a noise matrix with the
  head's own mean and standard deviation subtracted ("subtracting noise from the attention maps"; the public code
  perturbs each group's attention output ``(group, tokens·head_dim)``, as here).

Rounding fix (both): while the sum exceeds ``H``, take one from the largest allocation (first on ties); while it falls
short, give one to the smallest (the KDGQA code; DGQA's code picks a random group, we keep it deterministic). A
degenerate score vector (all norms equal to a relative :data:`EQUAL_NORMS`, or all zero) gives the uniform GQA
allocation (the code would divide by zero, or scale round-off up to the whole range).

Choices: the kernel registers the noncausal patterns only, as the paper (ViT image classification): the allocation
reads every key of the call, so in a causal model future keys would choose the groups of earlier queries. The
allocation is an integer decision; no gradient flows through the norms (as in the code, where it is a Python tuple).
Conversion of an MHA layer to this grouped form (mean-pooling each group's K/V projection heads, as GQA uptraining)
is ``az.nn.KeyDrivenGQA.from_mha``.

Fast path ``sdpa`` (:func:`sdpa_groups`): one fused SDPA call per KV head over its block of query heads (K/V read in
place: the call's single KV head serves the block by GQA broadcasting); a KV head with no query is skipped.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels.dense import sdpa_attention
from attnzoo.methods.common import dense_scores, softmax_rows, visible
from attnzoo.registry import NONCAUSAL_PATTERNS, Backend, Call, MethodSpec, Param, TestHints, register

EMA_BETA = 0.9  # weight of the current batch's norms in DGQA's moving average (the public code's β)
# norms within this relative spread count as equal (uniform groups): min-max scaling would blow round-off up to 0…1
EQUAL_NORMS = 1e-6


def _check_allocation(value: tuple[Any, ...], call: Call) -> str | None:
    if (len(value) != call.kv_heads
            or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in value)
            or sum(value) != call.heads):
        return (f"a tuple of {call.kv_heads} non-negative ints (query heads per KV head) summing to heads="
                f"{call.heads}")
    return None


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    """An uneven allocation: KV head 0 gets the query heads of the last KV head too (which gets none)."""
    g = call.heads // call.kv_heads
    allocation = [g] * call.kv_heads
    if call.kv_heads > 1:
        allocation[0], allocation[-1] = 2 * g, 0
    return {"allocation": tuple(allocation)}


SPEC = MethodSpec(
    name="key_driven_gqa",
    family="heads",
    mechanism="H2",
    paper="Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention",
    arxiv="2408.08454",
    summary="GQA whose query heads are dealt to KV heads in proportion to the key norms (KDGQA; DGQA/PGQA in the "
    "layer)",
    exact=True,
    patterns=NONCAUSAL_PATTERNS,
    params=(
        Param(
            "allocation", (tuple,), None,
            "query heads per KV head, in order (a tuple of kv_heads ints summing to heads); None: KDGQA, from the "
            "min-max scaled key norms of this call",
            check=_check_allocation,
        ),
    ),
    complexity="O(N²d) time (as GQA); one SDPA call per KV head",
    tests=TestHints(sample_params=_sample),
)


def uniform_allocation(heads: int, kv_heads: int) -> tuple[int, ...]:
    """GQA's allocation: ``heads / kv_heads`` query heads per KV head."""
    return (heads // kv_heads,) * kv_heads


def allocate(scores: torch.Tensor, heads: int, min_max: bool) -> tuple[int, ...]:
    """Query heads per KV head in proportion to ``scores (G,)`` (min-max scaled first if ``min_max``), rounded and
    fixed to sum to ``heads``; degenerate scores give the uniform allocation."""
    s = scores.detach().double().cpu()
    if min_max:
        span = s.max() - s.min()
        s = (s - s.min()) / span if span > EQUAL_NORMS * s.abs().max() else torch.zeros_like(s)
    if not bool(torch.isfinite(s).all()) or s.sum() <= 0:
        return uniform_allocation(heads, s.shape[0])
    a = torch.round(s / s.sum() * heads).long()
    while a.sum() > heads:
        a[torch.argmax(a)] -= 1
    while a.sum() < heads:
        a[torch.argmin(a)] += 1
    return tuple(a.tolist())


def key_norms(k: torch.Tensor) -> torch.Tensor:
    """``n_g = Σ_b ‖K_{b,g}‖_F``: each KV head's key norm over tokens and dims, summed over the batch, ``(G,)``."""
    return torch.linalg.vector_norm(k.detach().double(), dim=(2, 3)).sum(dim=0)


def key_norm_allocation(k: torch.Tensor, heads: int) -> tuple[int, ...]:
    """KDGQA: the allocation from this call's min-max scaled key norms."""
    return allocate(key_norms(k), heads, min_max=True)


def dgqa_allocation(
    norms: torch.Tensor, previous: torch.Tensor | None, heads: int, variant: str, beta: float = EMA_BETA,
) -> tuple[tuple[int, ...], torch.Tensor]:
    """DGQA: the allocation from this batch's key ``norms`` and the moving average ``previous`` of the norms before it
    (None before the first batch), and the updated average ``β·norms + (1 − β)·previous`` (``norms`` at first).

    ``variant``: ``"ema"`` allocates in proportion to the updated average, ``"diff"`` to ``|norms − previous|``
    (to ``norms`` at first)."""
    average = norms if previous is None else beta * norms + (1 - beta) * previous
    moved = norms if previous is None else (norms - previous).abs()
    scores = average if variant == "ema" else moved
    return allocate(scores, heads, min_max=False), average


def perturbed(out: torch.Tensor, group: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PGQA: ``out − noise`` for the heads' attention output ``out (B, H, N, Dv)`` in groups of ``group`` query heads.

    Per query head (a row of its group's ``(group, N·Dv)`` output), the noise is a standard Gaussian draw shared over
    the batch with the row's "diagonal" entry (element ``i`` of the group's row ``i``) set to 0, standardised per row
    and rescaled to the mean and standard deviation of that head's output in each batch element (the public code's
    construction; it draws uniform numbers before standardising, the paper speaks of Gaussian noise)."""
    b, h, n, dv = out.shape
    rows = out.reshape(b, h, n * dv)
    raw = torch.randn(h, n * dv, generator=generator, dtype=torch.float64).to(out.device)
    local = torch.arange(h) % group
    keep = local < n * dv
    raw[torch.arange(h)[keep], local[keep]] = 0.0
    std = raw.std(dim=-1, keepdim=True)
    raw = (raw - raw.mean(dim=-1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))
    noise = raw.to(out.dtype) * rows.std(dim=-1, keepdim=True) + rows.mean(dim=-1, keepdim=True)
    return (rows - noise).view(b, h, n, dv)


def query_groups(allocation: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The KV head each query head reads, ``(H,)``: ``allocation[g]`` consecutive query heads per KV head ``g``."""
    return torch.repeat_interleave(torch.arange(len(allocation), device=device),
                                   torch.tensor(allocation, device=device))


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, allocation: tuple[int, ...] | None,
) -> torch.Tensor:
    """Each query head's KV head copied out by the allocation, every score materialised."""
    if allocation is None:
        allocation = key_norm_allocation(k, q.shape[1])
    index = query_groups(allocation, q.device)
    k_heads, v_heads = k[:, index], v[:, index]
    s = dense_scores(q, k_heads, scale)
    if bias is not None:
        s = s + bias
    out = softmax_rows(s, visible(causal, mask, q, k_heads), v_heads)
    assert isinstance(out, torch.Tensor)
    return out


def _head_block(t: torch.Tensor | None, heads: slice) -> torch.Tensor | None:
    """The query heads ``heads`` of a 4-D mask or bias (one broadcast over heads stays as it is)."""
    return t if t is None or t.shape[1] == 1 else t[:, heads]


def sdpa_groups(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, allocation: tuple[int, ...] | None,
) -> torch.Tensor:
    """One SDPA call per KV head over the block of query heads it serves."""
    if allocation is None:
        allocation = key_norm_allocation(k, q.shape[1])
    parts, start = [], 0
    for g, count in enumerate(allocation):
        if count == 0:
            continue
        heads = slice(start, start + count)
        parts.append(sdpa_attention(q[:, heads], k[:, g:g + 1], v[:, g:g + 1], causal=causal, scale=scale,
                                    mask=_head_block(mask, heads), bias=_head_block(bias, heads)))
        start += count
    return torch.cat(parts, dim=1)


register(SPEC, reference, [Backend("sdpa", sdpa_groups)])
