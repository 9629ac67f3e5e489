"""L12 — Miras' three named memories, Moneta, Yaad and Memora (linear memory), beside Titans (:mod:`.titans`).

Paper: "It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online
Optimization" (Miras; Behrouz, Razaviyayn, Zhong, Mirrokni, arXiv:2504.13173), §5 (attentional biases, retention
gates) and §5.3 (the three models, eqs. 24–27). The update rules were read in the paper's equations as restated by
public reproductions (not copied); each is re-derived below for a matrix memory ``W (Dk, Dv)``, ``M(k) = Wᵀk``.

Every model learns ``W`` at test time from each token's key/value pair by one gradient step of an inner loss (the
attentional bias) under a retention gate, with no momentum (Miras' "memory learning algorithm" for all three is plain
gradient descent). As implemented (per query head; chunks of ``chunk_size`` tokens from the first token, ``W₀`` the
weights at the start of token ``t``'s chunk, ``a_t = 1 − α_t``)::

    g_t = θ_t k̂_t φ(W₀ᵀ k̂_t − v_t)ᵀ
    moneta:  A_t = a_t A_{t−1} − g_t,               W_t = A_t / ‖A_t‖_q^{q−2}        (ℓp bias, ℓq retention, eq. 24)
    yaad:    W_t = a_t W_{t−1} − g_t                                                  (Huber bias, ℓ2 retention, eq. 26)
    memora:  W_t = Softmax(a_t log W_{t−1} − g_t)                                    (ℓ2 bias, KL retention, eq. 27)
    o_t = W_tᵀ (scale · q̂_t)

- Moneta: ``φ(e) = sign(e)|e|^{p−1}`` (the ℓp bias ``(1/p)‖e‖_p^p``; the paper's factor ``p`` is absorbed into θ);
  the q-norm is entrywise over the whole matrix; defaults ``p = 3``, ``q = 4`` (the paper's). ``q = 2`` is titans'
  ``loss="lp"`` without momentum. ``A₀ = 0`` and ``W = 0`` while ``A = 0``.
- Yaad: ``φ(e) = e`` while ``‖e‖₂ ≤ δ_t``, else ``δ_t sign(e)`` (the paper's switch between the ℓ2 gradient and δ
  times the ℓ1 gradient on the whole error, eq. 26 — not titans' coordinate-wise Huber); ``delta`` a float or per
  token (the paper makes it data-dependent). It is titans with ``eta=0`` and ``loss="huber_switch"`` and runs on
  titans' exact linear chunk scan (:mod:`attnzoo.kernels.memory_scan`).
- Memora: ``φ(e) = e``; the softmax runs over ``Dk`` (each value coordinate's weights over the key coordinates are a
  probability vector, "row-wise" for the paper's ``(Dv, Dk)`` writing; the paper's mass ``c`` is 1); ``W₀`` uniform,
  ``1/Dk``. Computed in log space: ``log W_t = log_softmax(a_t log W_{t−1} − g_t)``.

Definition choices (shared with titans): gates ``theta`` (learning rate θ ≥ 0, the paper's η) and ``alpha``
(forgetting α ∈ [0, 1]; the paper's retention factor ``α_t`` is our ``1 − α_t``, so that the layer's gates mean the
same for every memory) are floats or ``(B, H, S)`` tensors; ``q̂, k̂`` L2-normalised by default; retrieval reads
``W_t`` after the token's own update; **chunks are part of the definition**: all gradients of a chunk are taken at
its start weights ``W₀`` while the retention runs per token, so ``chunk_size=1`` is the exact token recurrence. The
paper parallelises Moneta and Memora differently (the nonlinearity only at chunk borders, with Memora's first token
of each chunk as an exact "lag token"); we keep the per-token retention, which needs no approximation beyond
titans' mini-batch gradients. Linear (matrix) memory only: the paper's models use a two-layer MLP memory with a
residual and LayerNorm.

Reference (:func:`reference`): a plain loop over tokens with all three rules written out (O(N·D²), sequential).
Fast paths: Yaad on :func:`attnzoo.kernels.memory_scan.chunked`; Moneta and Memora on
:func:`attnzoo.kernels.retention_scan.chunked` (each chunk's gradients in one matmul, the nonlinear retention in a
loop over tokens). Decoding: fixed-size states (Yaad titans', the others ``X`` and the chunk-start weights);
a prompt then steps equals one forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo.kernels import retention_scan
from attnzoo.kernels.memory_scan import loss_gradient
from attnzoo.methods.common import repeat_kv
from attnzoo.methods.linear import titans
from attnzoo.methods.linear.common import qk_normed
from attnzoo.registry import Backend, Call, Decoder, MethodSpec, Param, TestHints, register

GATES = ("theta", "alpha")
TITANS_PARAMS = {p.name: p for p in titans.SPEC.params}
RULES = {  # method: (retention, inner loss)
    "moneta": ("lq", "lp"),
    "yaad": ("l2", "huber_switch"),
    "memora": ("kl", "l2"),
}


def gates_of(q: torch.Tensor, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``theta, alpha`` as ``(B, H, S)`` tensors."""
    return titans.gates_of(q, {"eta": 0.0, **params})[1:]  # type: ignore[return-value]


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, method: str, scale: float, theta: float | torch.Tensor,
    alpha: float | torch.Tensor, qk_l2norm: bool, chunk_size: int, p: float = 2.0, q_norm: float = 2.0,
    delta: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """The token loop of the module docstring's rules, in the input dtype."""
    retention, loss = RULES[method]
    b, h, n, dk = q.shape
    qs, kn = qk_normed(q, repeat_kv(k, h), scale, qk_l2norm)
    vr = repeat_kv(v, h)
    theta_, alpha_ = gates_of(q, {"theta": theta, "alpha": alpha})
    shape = (b, h, dk, vr.shape[-1])
    if retention == "kl":
        log_w = torch.full(shape, -math.log(dk), dtype=q.dtype, device=q.device)
        weights = log_w.exp()
    else:
        acc = weights = torch.zeros(shape, dtype=q.dtype, device=q.device)
    outs = []
    for t in range(n):
        if t % chunk_size == 0:
            chunk_start = weights
        k_t, keep = kn[:, :, t], (1.0 - alpha_[:, :, t, None, None])
        err = torch.einsum("bhd,bhde->bhe", k_t, chunk_start) - vr[:, :, t]
        threshold = delta[:, :, t, None] if isinstance(delta, torch.Tensor) else delta
        grad = theta_[:, :, t, None, None] * torch.einsum("bhd,bhe->bhde", k_t, loss_gradient(err, loss, threshold, p))
        if retention == "kl":
            log_w = torch.log_softmax(keep * log_w - grad, dim=-2)
            weights = log_w.exp()
        else:
            acc = keep * acc - grad
            norm = torch.linalg.vector_norm(acc, ord=q_norm, dim=(-2, -1), keepdim=True)
            weights = acc / torch.where(norm > 0, norm, torch.ones_like(norm)) ** (q_norm - 2)
        outs.append(torch.einsum("bhd,bhde->bhe", qs[:, :, t], weights))
    return torch.stack(outs, dim=2)


def _titans_params(params: dict[str, Any]) -> dict[str, Any]:
    """Yaad's parameters as titans': no momentum, the norm switch."""
    return {**params, "eta": 0.0, "loss": "huber_switch", "p": 2.0}


def _retained(
    method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, params: dict[str, Any],
    state: Any = None,
) -> tuple[torch.Tensor, Any]:
    """The fast path of ``method`` from ``state`` (None: the empty memory): ``(out, state)``."""
    if method == "yaad":  # one token runs titans' recurrence, several its chunked form
        return titans.decode_step(state, q, k, v, scale=scale, **_titans_params(params))
    retention, loss = RULES[method]
    h = q.shape[1]
    return retention_scan.chunked(
        q, titans.heads_of(k, h), titans.heads_of(v, h), *gates_of(q, params), retention=retention,
        chunk=params["chunk_size"], loss=loss, p=params.get("p", 2.0), q_norm=params.get("q_norm", 2.0), state=state,
        features=titans.maps(scale, params["qk_l2norm"]))


def _sample(call: Call, gen: torch.Generator) -> dict[str, Any]:
    shape = (call.batch, call.heads, call.seq_q)
    values = {
        "theta": 0.5 * torch.sigmoid(torch.randn(shape, generator=gen)),
        "alpha": torch.sigmoid(torch.randn(shape, generator=gen) - 3.0),
    }
    return {**{n: t.to(call.device, call.dtype) for n, t in values.items()}, "chunk_size": 8}


def _sample_yaad(call: Call, gen: torch.Generator) -> dict[str, Any]:
    delta = 0.5 + torch.rand((call.batch, call.heads, call.seq_q), generator=gen)
    return {**_sample(call, gen), "delta": delta.to(call.device, call.dtype)}


COMMON = (TITANS_PARAMS["theta"], TITANS_PARAMS["alpha"], TITANS_PARAMS["qk_l2norm"], TITANS_PARAMS["chunk_size"])
EXTRA = {
    "moneta": (TITANS_PARAMS["p"],
               Param("q_norm", (float,), 4.0, "exponent q ≥ 1 of the ℓq retention W = A / ‖A‖_q^{q−2}", low=1.0)),
    "yaad": (TITANS_PARAMS["delta"],),
    "memora": (),
}
SUMMARIES = {
    "moneta": "ℓp attentional bias, ℓq retention: A_t = (1−α_t)A_{t−1} − θ_t ∇ℓ_p(W₀), W_t = A_t / ‖A_t‖_q^{q−2}",
    "yaad": "Huber (norm switch) attentional bias, ℓ2 retention: W_t = (1−α_t)W_{t−1} − θ_t ∇H_δ(W₀)",
    "memora": "ℓ2 attentional bias, KL retention: W_t = Softmax((1−α_t) log W_{t−1} − θ_t ∇ℓ2(W₀)) on the simplex",
}


def _forward(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             params: dict[str, Any]) -> torch.Tensor:
    return _retained(method, q, k, v, scale, _kernel(params))[0]


# Each method's reference, fast path and decoder, as named module-level functions (one hop from their names).
def moneta_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any) -> torch.Tensor:
    return reference(q, k, v, method="moneta", scale=scale, **_kernel(p))


def yaad_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any) -> torch.Tensor:
    return reference(q, k, v, method="yaad", scale=scale, **_kernel(p))


def memora_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any) -> torch.Tensor:
    return reference(q, k, v, method="memora", scale=scale, **_kernel(p))


def moneta_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any) -> torch.Tensor:
    return _forward("moneta", q, k, v, scale, p)


def yaad_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any) -> torch.Tensor:
    return _forward("yaad", q, k, v, scale, p)


def memora_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **p: Any) -> torch.Tensor:
    return _forward("memora", q, k, v, scale, p)


def moneta_step(state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                **p: Any) -> tuple[torch.Tensor, Any]:
    """``T ≥ 1`` tokens from ``state`` (None: a new sequence; the prefill is the same call)."""
    return _retained("moneta", q, k, v, scale, p, state)


def yaad_step(state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
              **p: Any) -> tuple[torch.Tensor, Any]:
    """``T ≥ 1`` tokens from ``state`` (None: a new sequence; the prefill is the same call)."""
    return _retained("yaad", q, k, v, scale, p, state)


def memora_step(state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                **p: Any) -> tuple[torch.Tensor, Any]:
    """``T ≥ 1`` tokens from ``state`` (None: a new sequence; the prefill is the same call)."""
    return _retained("memora", q, k, v, scale, p, state)


def moneta_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                   **p: Any) -> tuple[torch.Tensor, Any]:
    return moneta_step(None, q, k, v, scale=scale, **p)


def yaad_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                 **p: Any) -> tuple[torch.Tensor, Any]:
    return yaad_step(None, q, k, v, scale=scale, **p)


def memora_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                   **p: Any) -> tuple[torch.Tensor, Any]:
    return memora_step(None, q, k, v, scale=scale, **p)


def _kernel(params: dict[str, Any]) -> dict[str, Any]:
    """The method's own parameters, without the backend call's ``causal``, ``mask`` and ``bias``."""
    return {n: v for n, v in params.items() if n not in ("causal", "mask", "bias")}


IMPLEMENTATIONS = {  # method: (reference, fast path, prefill, step)
    "moneta": (moneta_reference, moneta_torch, moneta_prefill, moneta_step),
    "yaad": (yaad_reference, yaad_torch, yaad_prefill, yaad_step),
    "memora": (memora_reference, memora_torch, memora_prefill, memora_step),
}


def _register(method: str) -> None:
    spec = MethodSpec(
        name=method,
        family="linear",
        mechanism="L12",
        paper="It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online "
              f"Optimization (Miras: {method.capitalize()}, linear memory)",
        arxiv="2504.13173",
        summary=SUMMARIES[method] + "; chunked mini-batch gradients",
        exact=True,
        patterns=frozenset({"self/causal"}),
        params=(*COMMON, *EXTRA[method]),
        complexity="O(N·C·(C+D) + N·D²) time" if method == "yaad" else
                   "O(N·D²) time (O(N) sequential small kernels), O(C·D²) memory per head; decoding O(D²) per token",
        supports_mask=False,
        supports_bias=False,
        subquadratic_memory=True,
        tests=TestHints(sample_params=_sample_yaad if method == "yaad" else _sample, atol=1e-4, rtol=1e-3),
    )
    ref, fast, prefill, step = IMPLEMENTATIONS[method]
    tokens = (*GATES, "delta") if method == "yaad" else GATES
    register(spec, ref, [Backend("torch", fast)], Decoder(prefill, step, token_params=tokens, chunked=True))


for _method in RULES:
    _register(_method)
