"""L1 — linear attention with a choice of feature map; parallel, chunked and recurrent forms.

Paper: "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention" (Katharopoulos et al.,
arXiv:2006.16236); the ``softmax_kernel`` map is FAVOR+ from "Rethinking Attention with Performers" (Choromanski et
al., arXiv:2009.14794).

Formula as implemented (causal: ``j ≤ i``; noncausal: every ``j``; cross lengths allowed noncausally)::

    a_ij = scale · φ(q_i) · φ(k_j)              (softmax_kernel: a_ij = φ(q_i) · φ(k_j), scale is its temperature)
    o_i  = Σ_j a_ij v_j / Σ_j a_ij              (normalize=True, default; a row with Σ_j a_ij ≤ 0 gives 0)
    o_i  = Σ_j a_ij v_j                         (normalize=False)

Feature maps ``φ`` (applied to each head's raw query/key vectors):

- ``elu1`` (default): ``elu(x) + 1``, the paper's map;
- ``relu``: ``max(x, 0)`` (rows whose features are all zero give 0);
- ``identity``: ``x``; it can be negative, so it needs ``normalize=False`` (refused otherwise);
- ``softmax_kernel``: Performer positive random features ``φ(x) = exp(W x' − |x'|²/2) / √m`` with ``x' = x·scale^½``
  so that ``E[φ(q)·φ(k)] = exp(scale · q·k)``; ``W`` is ``m = num_features`` (default ``round(D·ln D)``, at least
  ``D``) rows of block-orthogonal Gaussian directions rescaled to chi-distributed norms, drawn from ``seed``. With
  ``normalize=True`` each query's features are divided by ``exp(max_r (W q')_r)`` (the stabiliser FAVOR+ uses, which
  cancels in the ratio); keys are not stabilised, so that a decoding step sees the same key features as the prefill;
- any callable ``φ(x: (B, H, S, D)) -> (B, H, S, F)``, applied to queries and keys alike (with ``normalize=True`` its
  features must be non-negative; negative features raise an error naming ``feature_map``).

Choice: ``scale`` multiplies the scores (as in flash-linear-attention); it cancels when ``normalize=True``, so it is
not applied there.

Fast path ``torch`` (:func:`torch_chunked`): :mod:`attnzoo.kernels.linear_scan` — the chunked causal scan
(``chunk_size`` tokens per chunk, intra-chunk masked ``φ(Q)φ(K)ᵀ``, inter-chunk state by an exclusive cumulative sum of
chunk states, all chunks as batched matmuls; the elementwise maps ``elu1``/``relu`` run inside it one chunk group at a
time and are recomputed in its backward) or, noncausally, ``φ(Q)(φ(K)ᵀV)`` with the summary computed once per key head.
The normaliser is a column of ones appended to ``V``. O(N·F·Dv) time, O(N) memory. Recurrent form: :func:`prefill` and
:func:`step` (see :mod:`attnzoo.methods.linear.common`), state ``(B, Hkv, F, Dv + normalize)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kernels import linear_scan
from attnzoo.methods.common import repeat_kv, visible
from attnzoo.methods.linear.common import feature_prefill, feature_step
from attnzoo.registry import Backend, Call, Decoder, MethodSpec, Param, register

NAMED_MAPS = ("elu1", "relu", "identity", "softmax_kernel")
PATTERNS = frozenset({"self/causal", "self/noncausal", "cross/noncausal"})


def _check_map(value: Any, call: Call) -> str | None:
    if isinstance(value, str):
        if value not in NAMED_MAPS:
            return f"one of {list(NAMED_MAPS)} or a callable"
        if value == "identity" and call.params.get("normalize", True):
            return "a non-negative feature map with normalize=True (identity needs normalize=False)"
    elif not callable(value):
        return f"one of {list(NAMED_MAPS)} or a callable"
    return None


SPEC = MethodSpec(
    name="linear",
    family="linear",
    mechanism="L1",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    arxiv="2006.16236",
    summary="φ(Q)(φ(K)ᵀV) / φ(Q)φ(K)ᵀ1 with elu+1, relu, identity, Performer random features or any callable",
    exact=True,
    patterns=PATTERNS,
    params=(
        Param(
            "feature_map", (str, Callable), "elu1", "elu1, relu, identity, softmax_kernel, or a callable",
            check=_check_map,
        ),
        Param("normalize", (bool,), True, "divide by φ(q)·Σφ(k) (False: the unnormalised sum)"),
        Param("chunk_size", (int,), 128, "tokens per chunk of the causal chunked scan", low=1),
        Param("num_features", (int,), None, "softmax_kernel: random features m (None: round(D·ln D), ≥ D)", low=1),
        Param("seed", (int,), 0, "softmax_kernel: seed of the random projection"),
    ),
    complexity="O(N·F·Dv) time, O(N) memory; decoding O(F·Dv) per token",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
)


@functools.lru_cache(maxsize=32)
def _projection(dim: int, features: int, seed: int) -> torch.Tensor:
    """``(features, dim)`` block-orthogonal Gaussian directions with chi(dim) norms (FAVOR+), fp64 on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(math.ceil(features / dim), dim, dim, generator=gen, dtype=torch.float64)
    blocks = torch.linalg.qr(gaussian).Q.transpose(-1, -2).reshape(-1, dim)
    norms = torch.randn(features, dim, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
    return blocks[:features] * norms


def _random_features(x: torch.Tensor, w: torch.Tensor, stabilise: bool) -> torch.Tensor:
    proj = x @ w.T
    logits = proj - 0.5 * (x * x).sum(-1, keepdim=True)
    if stabilise:
        logits = logits - proj.amax(dim=-1, keepdim=True).detach()
    return torch.exp(logits) / math.sqrt(w.shape[0])


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x).add_(1.0)


ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"elu1": _elu1, "relu": F.relu}


def features(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, feature_map: str | Callable[[torch.Tensor], torch.Tensor],
    normalize: bool, num_features: int | None, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale·φ(q), φ(k))``, ``scale`` left out when ``normalize`` (it cancels there).

    softmax_kernel: ``(φ(q), φ(k))`` with the temperature inside ``φ``.
    """
    if feature_map == "softmax_kernel":
        d = q.shape[-1]
        m = num_features if num_features is not None else max(d, round(d * math.log(d)))
        w = _projection(d, m, seed).to(device=q.device, dtype=linear_scan.accumulation_dtype(q.dtype))
        root = math.sqrt(scale)
        qf = _random_features(q.to(w.dtype) * root, w, stabilise=normalize)
        return qf, _random_features(k.to(w.dtype) * root, w, stabilise=False)
    if feature_map in ELEMENTWISE:
        qf, kf = ELEMENTWISE[feature_map](q), ELEMENTWISE[feature_map](k)
    elif feature_map == "identity":
        qf, kf = q, k
    else:
        qf, kf = feature_map(q), feature_map(k)
        shapes_ok = qf.shape[:-1] == q.shape[:-1] and kf.shape[:-1] == k.shape[:-1] and qf.shape[-1] == kf.shape[-1]
        if qf.dim() != 4 or not shapes_ok:
            raise fail("feature_map", "a callable mapping (B, H, S, D) to (B, H, S, F)", f"shapes {tuple(qf.shape)}")
        if normalize and (bool((qf < 0).any()) or bool((kf < 0).any())):
            raise fail("feature_map", "non-negative features (normalize=True)", "negative features")
    return (qf if normalize else qf * scale), kf


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, feature_map: str | Callable[[torch.Tensor], torch.Tensor], normalize: bool,
    chunk_size: int, num_features: int | None, seed: int,
) -> torch.Tensor:
    qf, kf = features(
        q, k, scale=scale, feature_map=feature_map, normalize=normalize, num_features=num_features, seed=seed
    )
    a = (qf @ repeat_kv(kf, q.shape[1]).transpose(-1, -2)) * visible(causal, None, q, k)
    o = a @ repeat_kv(v, q.shape[1]).to(a.dtype)
    if normalize:
        den = a.sum(dim=-1, keepdim=True)
        o = torch.where(den > 0, o / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(o))
    return o.to(v.dtype)


def torch_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, feature_map: str | Callable[[torch.Tensor], torch.Tensor], normalize: bool,
    chunk_size: int, num_features: int | None, seed: int,
) -> torch.Tensor:
    if causal and feature_map in ELEMENTWISE:
        # The map runs inside the scan, one chunk group at a time (never a sequence-wide feature tensor; the backward
        # recomputes it per group); the scale of the unnormalised form moves to the output.
        fmap = ELEMENTWISE[feature_map]
        out = linear_scan.causal(q, k, v, chunk=chunk_size, normalize=normalize, features=(fmap, fmap))
        return out if normalize else out * scale
    qf, kf = features(
        q, k, scale=scale, feature_map=feature_map, normalize=normalize, num_features=num_features, seed=seed
    )
    if causal:
        return linear_scan.causal(qf, kf, v, chunk=chunk_size, normalize=normalize)
    return linear_scan.noncausal(qf, kf, v, normalize=normalize)


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal forward over a prompt (validated parameters ``p``), returning the scan's state."""
    qf, kf = features(q, k, scale=scale, **_feature_params(p))
    return feature_prefill(qf, kf, v, chunk_size=p["chunk_size"], normalize=p["normalize"])


def decode_step(
    state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token ``q (B, H, 1, D)``; ``state=None`` starts a new sequence."""
    qf, kf = features(q, k, scale=scale, **_feature_params(p))
    return feature_step(state, qf, kf, v, normalize=p["normalize"])


DECODER = Decoder(decode_prefill, decode_step)


def _feature_params(p: dict[str, Any]) -> dict[str, Any]:
    return {name: p[name] for name in ("feature_map", "normalize", "num_features", "seed")}


register(SPEC, reference, [Backend("torch", torch_chunked)], DECODER)
