"""L3 — Hedgehog: linear attention with trainable, spiky feature maps distilled from softmax attention.

Paper: "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry" (Zhang et al.,
arXiv:2402.04347).

Feature map as implemented (one per head, separate maps for queries and keys, as in the paper)::

    z    = (√scale · x) W_h + b_h                       W_h (D, F), b_h (F,); F = D by default
    φ(x) = [exp(z), exp(−z)]                            2F non-negative features

``exp`` makes the map spiky (it sharpens large dot products, like softmax) and monotone in each ``z``; the ``±`` pair
keeps negative directions. The paper initialises ``W = I``, ``b = 0`` (and so do the defaults and ``Param.init``).
Choice: inputs are scaled by ``√scale`` first, so that the maps see the logit scale of the softmax they mimic.

Attention (causal ``j ≤ i`` or noncausal; cross lengths allowed noncausally)::

    o_i = Σ_j (φ_q(q_i)·φ_k(k_j)) v_j / Σ_j φ_q(q_i)·φ_k(k_j)

Parameters ``q_weight (H, D, F)``, ``q_bias (H, F)``, ``k_weight (Hkv, D, F)``, ``k_bias (Hkv, F)``: learnable tensors
(owned by ``az.nn.Attention``); None means the identity initialisation. Numerics: each query's features are divided
by ``exp(max_r |z_r|)`` (the factor cancels in the ratio, so queries never overflow); keys are not stabilised, so a
decoding step sees the same key features as a prefill (features are computed in fp32 for half-precision inputs).

Distillation: :func:`distill` fits the four tensors on the user's (q, k) samples by minimising the KL divergence
from the softmax attention weights to the Hedgehog weights (:func:`softmax_kl`: the paper's soft-label cross-entropy,
up to a constant; masks and padded rows allowed), with Adam; :mod:`attnzoo.integrations.distill` does it inside a
Hugging Face transformers model. Layer: ``attnzoo.nn.Attention(..., method="hedgehog")`` owns the four map tensors;
:mod:`attnzoo.nn.layers.hedgehog` trains them as the paper does on the layer's own heads (``distillation_loss``, an
auxiliary loss whose gradient reaches only the maps, and ``distill_layer``, the conversion fit).

Fast path ``torch`` (:func:`torch_chunked`): :mod:`attnzoo.kernels.linear_scan` (chunked causal scan, or
``φ(Q)(φ(K)ᵀV)`` noncausally). Recurrent form: :func:`prefill` and :func:`step` (see
:mod:`attnzoo.methods.linear.common`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo.errors import fail
from attnzoo.kernels import linear_scan
from attnzoo.methods.common import repeat_kv, visible
from attnzoo.methods.linear.common import feature_prefill, feature_step
from attnzoo.registry import Backend, Call, Decoder, LayerInfo, MethodSpec, Param, TestHints, register

PATTERNS = frozenset({"self/causal", "self/noncausal", "cross/noncausal"})
NAMES = ("q_weight", "q_bias", "k_weight", "k_bias")


def _shape_check(which: str) -> Any:
    def check(value: Any, call: Call) -> str | None:
        heads = call.heads if which[0] == "q" else call.kv_heads
        if which.endswith("weight"):
            ok = value.dim() == 3 and value.shape[:2] == (heads, call.head_dim)
            return None if ok else f"a tensor of shape ({heads}, {call.head_dim}, F)"
        return None if value.dim() == 2 and value.shape[0] == heads else f"a tensor of shape ({heads}, F)"

    return check


def _eye(heads: int, dim: int) -> torch.Tensor:
    return torch.eye(dim).expand(heads, dim, dim).clone()


def _sample(call: Call, gen: torch.Generator) -> dict[str, Any]:
    d = call.head_dim

    def near_eye(heads: int) -> torch.Tensor:
        return _eye(heads, d) + 0.1 * torch.randn(heads, d, d, generator=gen)

    out = {
        "q_weight": near_eye(call.heads), "q_bias": 0.1 * torch.randn(call.heads, d, generator=gen),
        "k_weight": near_eye(call.kv_heads), "k_bias": 0.1 * torch.randn(call.kv_heads, d, generator=gen),
    }
    return {name: t.to(call.device, call.dtype) for name, t in out.items()}


SPEC = MethodSpec(
    name="hedgehog",
    family="linear",
    mechanism="L3",
    paper="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
    arxiv="2402.04347",
    summary="normalised linear attention with trainable per-head maps φ(x) = [exp(xW+b), exp(−xW−b)]",
    exact=True,
    patterns=PATTERNS,
    params=(
        Param("q_weight", (torch.Tensor,), None, "(H, D, F) query map weights; None: identity",
              check=_shape_check("q_weight"), init=lambda i: _eye(i.heads, i.head_dim)),
        Param("q_bias", (torch.Tensor,), None, "(H, F) query map biases; None: zero",
              check=_shape_check("q_bias"), init=lambda i: torch.zeros(i.heads, i.head_dim)),
        Param("k_weight", (torch.Tensor,), None, "(Hkv, D, F) key map weights; None: identity",
              check=_shape_check("k_weight"), init=lambda i: _eye(i.kv_heads, i.head_dim)),
        Param("k_bias", (torch.Tensor,), None, "(Hkv, F) key map biases; None: zero",
              check=_shape_check("k_bias"), init=lambda i: torch.zeros(i.kv_heads, i.head_dim)),
        Param("chunk_size", (int,), 128, "tokens per chunk of the causal chunked scan", low=1),
    ),
    complexity="O(N·F·Dv) time, O(N) memory; decoding O(F·Dv) per token",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample, atol=1e-4, rtol=1e-3),
)


def _map(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, root: float, query: bool,
) -> torch.Tensor:
    acc = linear_scan.accumulation_dtype(x.dtype)
    z = (x.to(acc) * root) if weight is None else (x.to(acc) * root) @ weight.to(acc)[None]
    if bias is not None:
        z = z + bias.to(acc)[None, :, None, :]
    if query:
        z_abs = z.abs().amax(dim=-1, keepdim=True).detach()
        return torch.cat([torch.exp(z - z_abs), torch.exp(-z - z_abs)], dim=-1)
    return torch.cat([torch.exp(z), torch.exp(-z)], dim=-1)


def features(q: torch.Tensor, k: torch.Tensor, scale: float, p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(φ_q(q), φ_k(k))`` for the call's map parameters ``p`` (``q_weight``, ``q_bias``, ``k_weight``, ``k_bias``)."""
    if (p.get("q_weight") is None) != (p.get("k_weight") is None) or (
        p.get("q_weight") is not None and p["q_weight"].shape[-1] != p["k_weight"].shape[-1]
    ):
        raise fail("k_weight", "the same output width F as q_weight (both given or both None)", "a mismatch")
    root = math.sqrt(scale)
    return (
        _map(q, p.get("q_weight"), p.get("q_bias"), root, query=True),
        _map(k, p.get("k_weight"), p.get("k_bias"), root, query=False),
    )


def weights(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None = None, **params: Any,
) -> torch.Tensor:
    """The dense ``(B, H, Sq, Skv)`` Hedgehog attention weights over the keys visible to each query (causality and
    the boolean ``mask``, True = attend; rows sum to 1; a row with no visible key is 0)."""
    qf, kf = features(q, k, scale, params)
    a = (qf @ repeat_kv(kf, q.shape[1]).transpose(-1, -2)) * visible(causal, mask, q, k)
    den = a.sum(dim=-1, keepdim=True)
    return torch.where(den > 0, a / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(a))


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    w = weights(q, k, causal=causal, scale=scale, **params)
    return (w @ repeat_kv(v, q.shape[1]).to(w.dtype)).to(v.dtype)


def torch_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    qf, kf = features(q, k, scale, params)
    if causal:
        return linear_scan.causal(qf, kf, v, chunk=params["chunk_size"], normalize=True)
    return linear_scan.noncausal(qf, kf, v, normalize=True)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal forward over a prompt (validated parameters ``p``), returning the scan's state."""
    qf, kf = features(q, k, scale, p)
    return feature_prefill(qf, kf, v, chunk_size=p["chunk_size"], normalize=True)


def decode_step(
    state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token ``q (B, H, 1, D)``; ``state=None`` starts a new sequence."""
    qf, kf = features(q, k, scale, p)
    return feature_step(state, qf, kf, v, normalize=True)


DECODER = Decoder(decode_prefill, decode_step)


def softmax_kl(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None, **params: Any,
) -> torch.Tensor:
    """The distillation loss: the mean over query rows of ``KL(softmax(scale·q kᵀ) ‖ Hedgehog weights)`` (the paper's
    soft-label cross-entropy less the softmax's entropy, which has no gradient), both over the keys visible to the
    row (causality and the boolean ``mask`` ``(B, 1 or H, Sq, Skv)``, True = attend). Rows counted: those with a
    visible key and, when given, ``rows (B, Sq)`` True (the real tokens of a padded batch). Scalar, differentiable in
    the map ``params``."""
    h = q.shape[1]
    seen = visible(causal, mask, q, k)
    logits = (scale * q @ repeat_kv(k, h).transpose(-1, -2)).masked_fill(~seen, float("-inf"))
    counted = seen.any(-1)
    if rows is not None:
        counted = counted & rows[:, None, :].to(torch.bool)
    log_target = torch.log_softmax(logits.masked_fill(~counted[..., None], 0.0), dim=-1)
    w = weights(q, k, causal=causal, scale=scale, mask=mask, **params)
    kl = (log_target.exp() * (log_target - torch.log(w.clamp_min(1e-30)))).masked_fill(~seen, 0.0).sum(-1)
    return kl[counted].mean()


def identity_maps(heads: int, kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The paper's initialisation of the map tensors (``W = I``, ``b = 0``; ``F = D``), by the specs' ``init``."""
    info = LayerInfo(heads=heads, kv_heads=kv_heads, head_dim=head_dim, params={})
    return {name: SPEC.param(name).init(info) for name in NAMES}  # type: ignore[misc]


def distill(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, scale: float | None = None, steps: int = 300,
    lr: float = 1e-2, init: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fit the feature maps to softmax attention on samples ``q (B, H, N, D)``, ``k (B, Hkv, N', D)``.

    Minimises :func:`softmax_kl` with Adam for ``steps`` steps, starting from ``init`` (default: the identity maps).
    Returns the fitted ``{q_weight, q_bias, k_weight, k_bias}`` (detached, ready to pass to ``attnzoo.attention`` or
    to copy into an ``nn`` layer) and the KL after each step (the first entry is the KL before any step). Samples are
    dense here: use short sequences. (:func:`attnzoo.integrations.distill.distill_hedgehog` does the same inside a
    transformers model, every layer at once.)
    """
    scale_ = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    start = init or identity_maps(q.shape[1], k.shape[1], q.shape[-1])
    params = {name: t.detach().to(q.device, q.dtype).clone().requires_grad_(True) for name, t in start.items()}
    q, k = q.detach(), k.detach()
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    history = []
    for i in range(steps + 1):
        kl = softmax_kl(q, k, causal=causal, scale=scale_, **params)
        history.append(float(kl.detach()))
        if i == steps:
            break
        opt.zero_grad()
        kl.backward()
        opt.step()
    return {name: t.detach() for name, t in params.items()}, history


register(SPEC, reference, [Backend("torch", torch_chunked)], DECODER)
