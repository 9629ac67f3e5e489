"""L7 — EcoFormer: linear attention on binary hash codes of queries and keys; parallel, chunked and recurrent forms.

Paper: "EcoFormer: Energy-Saving Attention with Linear Complexity" (Liu et al., arXiv:2209.09004). The hash and the
attention follow the authors' public code (ziplab/EcoFormer: ``KernelSH``, ``EcoformerFastAttention``).

Kernelized hash as implemented (per key head; query head ``h`` uses its key head's hash so codes are comparable)::

    x̂    = x / ‖x‖                                             (0 for a zero vector)
    κ_m  = exp(−‖x̂ − a_m‖² / (2·bandwidth)) − μ_m              RBF kernel to m anchors a_m, centred by μ
    y    = A κ                                                  A: (bits, m) hash projection
    h(x) = sign(y) ∈ {−1, +1}^b    (sign(0) = +1);  code bits c = (h + 1)/2 ∈ {0, 1}

Attention (causal ``j ≤ i`` or noncausal; cross lengths allowed noncausally), ``b = bits``::

    a_ij = h(q_i)·h(k_j) + b + 1 = 2b + 1 − 2·Hamming(c(q_i), c(k_j))      ∈ [1, 2b + 1], never 0
    o_i  = Σ_j a_ij v_j / Σ_j a_ij

so ``O = [H(Q), b+1]([H(K), 1]ᵀ[V, 1])`` with the normaliser as the last column: linear in N.

Parameters ``anchors (Hkv, m, D)``, ``hash_weight (Hkv, b, m)``, ``kernel_mean (Hkv, m)``: learnable tensors (owned by
``az.nn.Attention``). None draws them from ``seed`` (anchors: Gaussian directions normalised to unit length; ``A``:
standard Gaussian, the paper's initialisation; ``μ``: 0) with ``bits`` and ``num_anchors`` setting the sizes.

Choices:

- The authors' bandwidth is the mean squared anchor distance of the current batch, which makes a token's code depend
  on every other token (not causal, not decodable); here it is a fixed ``bandwidth`` (default 2.0, the mean squared
  distance between random unit vectors, so the default kernel is ``exp(−‖x̂ − a‖²/4)``).
- The authors' numerator adds ``(b + 1)·v_i`` (the query's own value) where the normaliser adds ``N·(b + 1)``; this
  file uses the consistent ``Σ_j (b + 1) v_j``, so every row of weights sums to 1.
- The authors train ``A`` offline by kernel-based supervised hashing (KSH) and detach it in the forward. Here the codes
  are differentiable through a straight-through estimator: forward ``sign(y)``, backward the gradient of
  ``clamp(y, −1, 1)`` (the clipped STE of the authors' ``BinaryQuantizer``), so gradients reach q, k, the anchors,
  ``A`` and ``μ``; the values ``v`` get exact gradients.
- A code bit can flip between fp32 and fp64 when ``|y|`` is at rounding level; outputs then differ by one bit's
  weight (a discontinuity of the method itself).

Fast path ``torch`` (:func:`torch_chunked`): the codes as ``±1`` features ``[h(q), b+1]`` and ``[h(k), 1]`` through
:mod:`attnzoo.kernels.linear_scan` (chunked causal scan, or the key summary ``[H(K), 1]ᵀ[V, 1]`` once per key head
noncausally), O(N·(m·D + b·Dv)) time, O(N) memory. Bit packing (popcount Hamming distances) only pays for the
quadratic form ``H(Q)H(K)ᵀ``, which the linear form never builds: here the codes meet ``V`` in one matmul, where
unpacked ``±1`` floats are the fastest CPU operand. Recurrent form: :func:`prefill` and :func:`step` (see
:mod:`attnzoo.methods.linear.common`), state ``(B, Hkv, b + 1, Dv + 1)``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kernels import linear_scan
from attnzoo.methods.common import repeat_kv, visible
from attnzoo.methods.linear.common import feature_prefill, feature_step
from attnzoo.registry import Backend, Call, Decoder, LayerInfo, MethodSpec, Param, TestHints, register

PATTERNS = frozenset({"self/causal", "self/noncausal", "cross/noncausal"})
NAMES = ("anchors", "hash_weight", "kernel_mean")


def _shape_check(which: str) -> Any:
    def check(value: Any, call: Call) -> str | None:
        hkv = call.kv_heads
        if which == "anchors":
            ok = value.dim() == 3 and value.shape[0] == hkv and value.shape[2] == call.head_dim
            return None if ok else f"a tensor of shape ({hkv}, m, {call.head_dim})"
        if which == "hash_weight":
            return None if value.dim() == 3 and value.shape[0] == hkv else f"a tensor of shape ({hkv}, bits, m)"
        return None if value.dim() == 2 and value.shape[0] == hkv else f"a tensor of shape ({hkv}, m)"

    return check


@functools.lru_cache(maxsize=32)
def _drawn(kv_heads: int, anchors: int, dim: int, bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``(unit anchors (Hkv, m, D), Gaussian A (Hkv, b, m))`` in fp64 on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(kv_heads, anchors, dim, generator=gen, dtype=torch.float64)
    a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    return a, torch.randn(kv_heads, bits, anchors, generator=gen, dtype=torch.float64)


def _init(which: str) -> Any:
    def init(i: LayerInfo) -> torch.Tensor:
        m, bits, seed = i.params.get("num_anchors", 20), i.params.get("bits", 16), i.params.get("seed", 0)
        if which == "kernel_mean":
            return torch.zeros(i.kv_heads, m)
        anchors, weight = _drawn(i.kv_heads, m, i.head_dim, bits, seed)
        return (anchors if which == "anchors" else weight).float()

    return init


def _sample(call: Call, gen: torch.Generator) -> dict[str, Any]:
    m, bits = 5, 6
    anchors = torch.randn(call.kv_heads, m, call.head_dim, generator=gen)
    out = {
        "anchors": anchors / anchors.norm(dim=-1, keepdim=True),
        "hash_weight": torch.randn(call.kv_heads, bits, m, generator=gen),
        "kernel_mean": 0.5 * torch.rand(call.kv_heads, m, generator=gen),
    }
    return {name: t.to(call.device, call.dtype) for name, t in out.items()}


SPEC = MethodSpec(
    name="ecoformer",
    family="linear",
    mechanism="L7",
    paper="EcoFormer: Energy-Saving Attention with Linear Complexity",
    arxiv="2209.09004",
    summary="normalised linear attention on kernelized binary hash codes: a_ij = h(q_i)·h(k_j) + b + 1",
    exact=True,
    patterns=PATTERNS,
    params=(
        Param("anchors", (torch.Tensor,), None, "(Hkv, m, D) RBF anchors of the hash; None: drawn from seed",
              check=_shape_check("anchors"), init=_init("anchors")),
        Param("hash_weight", (torch.Tensor,), None, "(Hkv, bits, m) hash projection A; None: drawn from seed",
              check=_shape_check("hash_weight"), init=_init("hash_weight")),
        Param("kernel_mean", (torch.Tensor,), None, "(Hkv, m) kernel centring μ; None: 0",
              check=_shape_check("kernel_mean"), init=_init("kernel_mean")),
        Param("bandwidth", (float,), 2.0, "RBF kernel exp(−‖x̂ − a‖²/(2·bandwidth))", low=0.0, low_open=True),
        Param("bits", (int,), 16, "hash bits b when hash_weight is None", low=1),
        Param("num_anchors", (int,), 20, "anchors m when anchors/hash_weight are None", low=1),
        Param("seed", (int,), 0, "seed of the drawn anchors and projection"),
        Param("chunk_size", (int,), 128, "tokens per chunk of the causal chunked scan", low=1),
    ),
    complexity="O(N·(m·D + b·Dv)) time, O(N) memory; decoding O(b·Dv) per token",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample),
)


def _hash_params(x: torch.Tensor, kv_heads: int, p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(anchors, A, μ)`` as tensors of ``x``'s device and dtype, with the sizes checked against each other."""
    anchors, weight, mean = p.get("anchors"), p.get("hash_weight"), p.get("kernel_mean")
    if anchors is None or weight is None:
        m = anchors.shape[1] if anchors is not None else weight.shape[2] if weight is not None else p["num_anchors"]
        drawn_a, drawn_w = _drawn(kv_heads, m, x.shape[-1], p["bits"], p["seed"])
        anchors = drawn_a if anchors is None else anchors
        weight = drawn_w if weight is None else weight
    m = anchors.shape[1]
    if weight.shape[2] != m:
        raise fail("hash_weight", f"shape (Hkv, bits, {m}) (m from anchors)", tuple(weight.shape))
    if mean is None:
        mean = torch.zeros(kv_heads, m)
    elif mean.shape[1] != m:
        raise fail("kernel_mean", f"shape (Hkv, {m}) (m from anchors)", tuple(mean.shape))
    return tuple(t.to(device=x.device, dtype=x.dtype) for t in (anchors, weight, mean))  # type: ignore[return-value]


def hash_codes(x: torch.Tensor, p: dict[str, Any], kv_heads: int) -> torch.Tensor:
    """``h(x) ∈ {−1, +1}^b`` for ``x (B, Hx, S, D)`` (``Hx`` a multiple of ``kv_heads``), with the clipped STE."""
    acc = linear_scan.accumulation_dtype(x.dtype)
    x = x.to(acc)
    anchors, weight, mean = _hash_params(x, kv_heads, p)
    g = x.shape[1] // kv_heads
    if g > 1:  # each query head uses its key head's hash
        anchors, weight, mean = (t.repeat_interleave(g, dim=0) for t in (anchors, weight, mean))
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    unit = x / norm.clamp_min(torch.finfo(acc).tiny)
    # ‖x̂ − a‖² = ‖x̂‖² + ‖a‖² − 2 x̂·a, with ‖x̂‖² = 1 (0 for a zero vector; a constant, so its gradient is exact)
    unit_sq = (norm > 0).to(acc)
    sq_dist = unit_sq + (anchors * anchors).sum(-1)[None, :, None] - 2 * unit @ anchors[None].transpose(-1, -2)
    kernel = torch.exp(sq_dist / (-2.0 * p["bandwidth"])) - mean[None, :, None]
    y = kernel @ weight[None].transpose(-1, -2)  # (B, Hx, S, b)
    soft = y.clamp(-1.0, 1.0)
    hard = torch.where(y >= 0, 1.0, -1.0).to(acc)
    return hard + (soft - soft.detach()) if soft.requires_grad else hard


def features(q: torch.Tensor, k: torch.Tensor, p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([h(q), b+1], [h(k), 1])``: their dot product is the EcoFormer score ``h(q)·h(k) + b + 1``."""
    hq, hk = hash_codes(q, p, k.shape[1]), hash_codes(k, p, k.shape[1])
    bits = hq.shape[-1]
    return (
        torch.cat([hq, hq.new_full((*hq.shape[:-1], 1), bits + 1.0)], dim=-1),
        torch.cat([hk, hk.new_ones(*hk.shape[:-1], 1)], dim=-1),
    )


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    """Dense: bits ``c = (h+1)/2``, ``a_ij = 2b + 1 − 2·Hamming(c_i, c_j)`` on visible pairs, rows normalised."""
    h = q.shape[1]
    cq = (hash_codes(q, params, k.shape[1]) + 1) / 2
    ck = repeat_kv((hash_codes(k, params, k.shape[1]) + 1) / 2, h)
    hamming = cq @ (1 - ck).transpose(-1, -2) + (1 - cq) @ ck.transpose(-1, -2)
    a = (2 * cq.shape[-1] + 1 - 2 * hamming) * visible(causal, None, q, k)
    den = a.sum(dim=-1, keepdim=True)
    o = a @ repeat_kv(v, h).to(a.dtype)
    o = torch.where(den > 0, o / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(o))
    return o.to(v.dtype)


def torch_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    qf, kf = features(q, k, params)
    if causal:
        return linear_scan.causal(qf, kf, v, chunk=params["chunk_size"], normalize=True)
    return linear_scan.noncausal(qf, kf, v, normalize=True)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal forward over a prompt (validated parameters ``p``), returning the scan's state."""
    qf, kf = features(q, k, p)
    return feature_prefill(qf, kf, v, chunk_size=p["chunk_size"], normalize=True)


def decode_step(
    state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token ``q (B, H, 1, D)``; ``state=None`` starts a new sequence."""
    qf, kf = features(q, k, p)
    return feature_step(state, qf, kf, v, normalize=True)


DECODER = Decoder(decode_prefill, decode_step)


register(SPEC, reference, [Backend("torch", torch_chunked)], DECODER)
