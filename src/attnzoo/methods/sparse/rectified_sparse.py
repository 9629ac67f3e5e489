"""D10 — Rectified SpaAttn: block-sparse attention whose kept weights are rescaled to the full attention's estimated
mass, and whose dropped blocks are added back as pooled estimates where pooling is reliable.

Paper: "Rectified SpaAttn: Revisiting Attention Sparsity for Efficient Video Generation" (Liu et al.,
arXiv:2511.19835); code github.com/BienLuky/Rectified-SpaAttn (``rectified_spaattn/rectified_wan21_attn.py``, the
single-modality form, and ``gapr_mask.py``).

The paper's point: block-sparse attention normalises its softmax over the kept blocks only, so the kept (critical)
weights are *amplified* by ``1 / (their true share of the mass)``, and the dropped (non-critical) blocks lose their
mass entirely. Both biases are rectified with an implicit full-attention reference computed from pooled queries and
keys. Formula as implemented (noncausal; queries and keys cut into blocks of ``block_size``, the last ones partial):

1. **Pooled scores and block mass** (IPAR, isolated-pooling attention reallocation). With block means ``q̄_a``,
   ``k̄_b``, ``v̄_b`` and ``n_b`` keys in block ``b``, every key of block ``b`` is taken to score ``scale · q̄_a·k̄_b``,
   so the estimated full-attention mass of key block ``b`` for query block ``a`` is::

       p̂_ab = n_b exp(scale · q̄_a·k̄_b) / Σ_c n_c exp(scale · q̄_a·k̄_c)

   (the code's ``softmax`` of the pooled scores: every block there has ``n_b = block_size``; its multimodal form
   reallocates between pooled video blocks of multiplicity ``block_size`` and isolated text tokens of multiplicity 1,
   which is this formula with those multiplicities).
2. **Selection**: blocks by decreasing ``p̂_ab``; the ``count_a`` first, where ``count_a`` is one more than the number
   of blocks whose cumulative mass is ``≤ threshold`` (the fewest blocks whose mass passes ``threshold``), but at least
   ``⌊keep · Nk⌋`` (the code: ``max(count, top_k)`` with ``top_k = int((1 − sa_drop_rate) · blocks)``).
3. **Reliability** (GAPR, gain-aware pooling rectification): a dropped block is represented by its pooled estimate
   only where the pooling's gain exceeds its error, ``|q̄_a·k̄_b| > |δq_a·k̄_b| + |q̄_a·δk_b|`` with
   ``δq_a = mean_{i∈a} |q_i − q̄_a|`` and ``δk_b = mean_{j∈b} |k_j − k̄_b|`` (elementwise; unscaled dot products, the
   block-size factors of the code cancel). ``P_a``: the dropped blocks that pass; the others (unreliable) are left out.
4. **Output**: exact softmax over the selected blocks ``S_a`` (``O^S_i``), scaled by the estimated mass of the blocks
   that are not replaced by an estimate, plus the pooled estimates::

       O_i = R_a · O^S_i + Σ_{b ∈ P_a} p̂_ab v̄_b,      R_a = Σ_{b ∉ P_a} p̂_ab = 1 − Σ_{b ∈ P_a} p̂_ab

   (``a`` is ``i``'s query block). With nothing dropped it is exactly softmax attention.

Defaults ``block_size=128, keep=0.25, threshold=0.3``: the code's (blocks of 128, ``sa_drop_rate 0.75``,
``p_remain_rates 0.3``). Choices: block means over the real rows of a partial last block (the code zero-pads, which
biases the last block's means); no text tokens, no physical-neighbour blocks of a video layout, no first-frame blocks
(those are layout-specific additions of the video pipelines; give them as a selection to ``block_sparse``). The pooled
mass ``p̂`` is differentiable (gradients reach q, k through it, and v through ``v̄``); the selection and ``P`` are not.

Reference (:func:`reference`): :func:`plan` (steps 1–3 on the same inputs, the rule), then the rectified attention
*map* built densely — ``R_a · softmax over the selected keys`` on selected keys, ``p̂_ab / n_b`` on every key of a block
of ``P_a`` — times ``V``. Fast path ``torch`` (:func:`torch_rectified`): :func:`plan`, then
:func:`attnzoo.kernels.block_sparse.selected_attention` for ``O^S``, rescaled by ``R`` and added to ``(p̂ · P) V̄``:
time ``O(density · N² · d + Nq·Nk·d)``, no dense scores. No log-sum-exp (``return_lse`` raises): the output is the
rescaled softmax ``R_a · O^S`` plus pooled estimates ``p̂_ab v̄_b`` added outside it, not one softmax over a set of
keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.kernels.block_sparse import selected_attention
from attnzoo.kernels.blockwise import grouped_logits, grouped_pv
from attnzoo.kernels.dense import safe_softmax
from attnzoo.kernels.selection import BlockSelection, block_means
from attnzoo.methods.common import dense_scores, repeat_kv
from attnzoo.registry import NONCAUSAL_PATTERNS, Backend, Call, MethodSpec, Param, TestHints, register


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sample(call: Call, gen: torch.Generator) -> dict[str, Any]:
    def pick(options: tuple[Any, ...]) -> Any:
        return options[int(torch.randint(0, len(options), (1,), generator=gen))]

    return {"block_size": int(torch.randint(1, 9, (), generator=gen)), "keep": pick((0.0, 0.2, 0.5, 1.0)),
            "threshold": pick((0.0, 0.3, 0.6))}


def at_density(call: Call, fraction: float) -> dict[str, Any]:
    """Blocks of 64, ``⌊fraction · Nk⌋`` blocks by the top-k floor and no threshold beyond one block."""
    return {"block_size": 64, "keep": fraction, "threshold": 0.0}


SPEC = MethodSpec(
    name="rectified_sparse",
    family="sparse",
    mechanism="D10",
    paper="Rectified SpaAttn: Revisiting Attention Sparsity for Efficient Video Generation",
    arxiv="2511.19835",
    summary="block-sparse attention by pooled mass (threshold, top-k floor), kept weights rescaled to their "
            "estimated full mass, reliable dropped blocks added back as pooled estimates",
    exact=False,
    patterns=NONCAUSAL_PATTERNS,
    params=(
        Param("block_size", (int,), 128, "queries and keys per block (the last ones may be partial)", low=1),
        Param("keep", (float,), 0.25, "fraction of the key blocks always selected (the paper's 1 − drop rate)",
              low=0.0, high=1.0),
        Param("threshold", (float,), 0.3, "more blocks are selected until their estimated mass passes it",
              low=0.0, high=1.0),
    ),
    complexity="O(density·N²·d + Nq·Nk·d) time, O(N·d + Nq·Nk) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
    at_density=at_density,
)


@dataclass(frozen=True)
class Plan:
    """What Rectified SpaAttn decides for a call: ``selection`` (the blocks attended exactly, one selection per query
    head), ``mass (B, H, Nq, Nk)`` the estimated full-attention block mass ``p̂`` (rows sum to 1; differentiable),
    ``pooled (B, H, Nq, Nk)`` bool the dropped blocks represented by their pooled estimate (``P``). Float64 for
    float64 inputs, else float32."""

    selection: BlockSelection
    mass: torch.Tensor
    pooled: torch.Tensor

    def kept_mass(self) -> torch.Tensor:
        """``R (B, H, Nq)``: the estimated mass of the blocks not replaced by an estimate."""
        return (self.mass * ~self.pooled).sum(-1)


def _deviation(x: torch.Tensor, means: torch.Tensor, block: int) -> torch.Tensor:
    """``mean_{i ∈ block} |x_i − x̄_block|`` per block (elementwise), over the real rows of a partial block."""
    return block_means((x - means.repeat_interleave(block, dim=2)[:, :, : x.shape[2]]).abs(), block)


def plan(q: torch.Tensor, k: torch.Tensor, *, scale: float, block_size: int = 128, keep: float = 0.25,
         threshold: float = 0.3) -> Plan:
    """Steps 1–3 of the module docstring for ``q (B, H, Sq, D)``, ``k (B, Hkv, Skv, D)``."""
    h, sq, skv = q.shape[1], q.shape[2], k.shape[2]
    nk = _cdiv(skv, block_size)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # half inputs: pooled statistics in fp32
    q, k = q.to(acc), k.to(acc)
    q_bar, k_bar = block_means(q, block_size), block_means(k, block_size)  # (B, H, Nq, D), (B, Hkv, Nk, D)
    dots = grouped_logits(q_bar, k_bar, 1.0)  # (B, H, Nq, Nk), unscaled
    counts = torch.full((nk,), float(block_size), dtype=dots.dtype, device=q.device)
    counts[-1] = skv - (nk - 1) * block_size
    mass = torch.softmax(scale * dots + counts.log(), dim=-1)
    with torch.no_grad():
        ranked, order = mass.detach().sort(dim=-1, descending=True)
        needed = (ranked.cumsum(dim=-1) <= threshold).sum(-1, keepdim=True) + 1
        needed = needed.clamp(min=int(keep * nk), max=nk)  # (B, H, Nq, 1)
        width = int(needed.max())
        slots = torch.arange(width, device=q.device)
        indices = order[..., :width].masked_fill(slots >= needed, -1)
        selected = BlockSelection(indices, block_size, block_size, sq, skv)
        error = (grouped_logits(_deviation(q, q_bar, block_size), k_bar, 1.0).abs()
                 + grouped_logits(q_bar, _deviation(k, k_bar, block_size), 1.0).abs())
        pooled = (dots.abs() > error) & ~selected.blocks(h)
    return Plan(selected, mass, pooled)


def select(q: torch.Tensor, k: torch.Tensor, *, scale: float, block_size: int = 128, keep: float = 0.25,
           threshold: float = 0.3) -> BlockSelection:
    """The blocks Rectified SpaAttn attends exactly (:attr:`Plan.selection`)."""
    return plan(q, k, scale=scale, block_size=block_size, keep=keep, threshold=threshold).selection


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: int, keep: float, threshold: float,
) -> torch.Tensor:
    p = plan(q, k, scale=scale, block_size=block_size, keep=keep, threshold=threshold)
    h, sq, skv = q.shape[1], q.shape[2], k.shape[2]

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, H, Nq, Nk) -> (B, H, Sq, Skv)
        return x.repeat_interleave(block_size, 2)[:, :, :sq].repeat_interleave(block_size, 3)[..., :skv]

    sizes = torch.bincount(torch.arange(skv, device=q.device) // block_size).to(p.mass.dtype)
    exact = safe_softmax(dense_scores(q, k, scale), p.selection.dense(h))  # softmax over the selected keys
    weights = tokens(p.kept_mass().unsqueeze(-1).expand_as(p.mass)) * exact + tokens(p.mass * p.pooled / sizes)
    return (weights @ repeat_kv(v, h).to(weights.dtype)).to(v.dtype)


def torch_rectified(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, block_size: int, keep: float, threshold: float,
) -> torch.Tensor:
    p = plan(q, k, scale=scale, block_size=block_size, keep=keep, threshold=threshold)
    out = selected_attention(q, k, v, p.selection, scale=scale, causal=False)
    estimate = grouped_pv(p.mass * p.pooled, block_means(v.to(p.mass.dtype), block_size))  # (B, H, Nq, Dv)
    rows = torch.cat([p.kept_mass().unsqueeze(-1), estimate], dim=-1)
    rows = rows.repeat_interleave(block_size, dim=2)[:, :, : q.shape[2]].to(out.dtype)
    return out * rows[..., :1] + rows[..., 1:]


register(SPEC, reference, [Backend("torch", torch_rectified)])
