"""L10 — the gated delta rule (Gated DeltaNet), with a chunked WY/UT form and a recurrent form.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (Yang, Kautz, Hatamizadeh, arXiv:2412.06464), eq. (10)
and its Appendix A (extended WY representation); NAtS-L uses it as its linear branch.

Recurrence as implemented (per query head; ``S`` is ``(Dk, Dv)``, the transpose of the paper's ``(Dv, Dk)``)::

    S_t = α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ,     o_t = S_tᵀ (scale · q̂_t),     α_t = exp(g_t)

with ``q̂, k̂ = x / sqrt(|x|² + 1e-6)`` when ``qk_l2norm=True`` (default; the paper normalises q and k, which keeps
``I − β k kᵀ`` a contraction for ``β ∈ [0, 2]``), else the raw vectors. Parameters (data-dependent in the paper, so
they are inputs here; the layer around produces them): ``log_gate`` = ``g``, a ``(B, H, S)`` tensor of log decays
``≤ 0`` (None: no gating, α = 1, which is DeltaNet); ``beta`` = ``β``, a float or a ``(B, H, S)`` tensor in
``[0, 2]`` (default 1.0; the paper uses ``sigmoid`` outputs in (0, 1)). Causal self-attention only.

Layer: ``attnzoo.nn.Attention(..., method="gated_delta")`` builds Gated DeltaNet's layer around this kernel
(:mod:`attnzoo.nn.layers.gated_delta`: short convolutions, data-dependent ``β`` and decay, gated RMSNorm output);
``faithful=False`` gives the bare kernel, to which ``log_gate``/``beta`` are passed.

Reference (the parallel form over the whole sequence, dense and quadratic): with ``G_t = Σ_{s≤t} g_s`` and
``Γ_ti = exp(G_t − G_i)`` for ``i ≤ t``, the pseudo values solve ``(I + tril(diag(β)(K̂K̂ᵀ ⊙ Γ), −1)) U = diag(β) V``
(one ``N×N`` unit-lower-triangular solve) and ``O = (scale·Q̂K̂ᵀ ⊙ Γ ⊙ causal) U``.

Fast path ``torch`` (:func:`torch_chunked`): :mod:`attnzoo.kernels.delta_scan`, chunks of ``chunk_size`` tokens: a
batched triangular solve per chunk for the WY factors, batched intra-chunk matmuls, and a loop over chunks of one
``Dk×Dk`` by ``Dk×Dv`` product for the state. O(N·C·D + N·D²) time, O(N·C) memory. GQA: key/value heads are repeated to
the query heads (each query head has its own gates, hence its own state). Recurrent form: :func:`prefill` and
:func:`step` (see :mod:`attnzoo.methods.linear.common`); ``log_gate``/``beta`` for a step are ``(B, H, 1)``; state
``(B, H, Dk, Dv)``.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels import delta_scan, linear_scan
from attnzoo.methods.common import repeat_kv
from attnzoo.methods.linear.common import qk_normed
from attnzoo.registry import Backend, Call, Decoder, MethodSpec, Param, TestHints, register


def _per_token(name: str, low: float, high: float) -> Any:
    def check(value: Any, call: Call) -> str | None:
        if isinstance(value, torch.Tensor):
            if tuple(value.shape) != (call.batch, call.heads, call.seq_q):
                return f"a float or a tensor of shape {(call.batch, call.heads, call.seq_q)} (batch, heads, seq)"
            if not value.is_floating_point() or not bool(((value >= low) & (value <= high)).all()):
                return f"{name} values in [{low}, {high}]"
        return None

    return check


def _sample(call: Call, gen: torch.Generator) -> dict[str, Any]:
    shape = (call.batch, call.heads, call.seq_q)
    log_gate = torch.nn.functional.logsigmoid(torch.randn(shape, generator=gen) + 3.0)
    beta = torch.sigmoid(torch.randn(shape, generator=gen))
    return {"log_gate": log_gate.to(call.device, call.dtype), "beta": beta.to(call.device, call.dtype)}


SPEC = MethodSpec(
    name="gated_delta",
    family="linear",
    mechanism="L10",
    paper="Gated Delta Networks: Improving Mamba2 with Delta Rule",
    arxiv="2412.06464",
    summary="S_t = α_t(I − β_t k_t k_tᵀ)S_{t−1} + β_t k_t v_tᵀ, o_t = S_tᵀq_t; chunked WY/UT form",
    exact=True,
    patterns=frozenset({"self/causal"}),
    params=(
        Param("log_gate", (torch.Tensor,), None, "(B, H, S) log decays g ≤ 0 (α = exp g); None: α = 1 (DeltaNet)",
              check=_per_token("log_gate", float("-inf"), 0.0)),
        Param("beta", (float, torch.Tensor), 1.0, "writing strength β in [0, 2]: a float or a (B, H, S) tensor",
              low=0.0, high=2.0, check=_per_token("beta", 0.0, 2.0)),
        Param("qk_l2norm", (bool,), True, "L2-normalise queries and keys (as the paper does)"),
        Param("chunk_size", (int,), 64, "tokens per chunk of the chunked WY form", low=1),
    ),
    complexity="O(N·(C+D)·D) time, O(N·C) memory; decoding O(D²) per token",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample, atol=1e-4, rtol=1e-3),
)


def _gates(
    q: torch.Tensor, log_gate: torch.Tensor | None, beta: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = q.shape[:3]
    g = torch.zeros(shape, dtype=q.dtype, device=q.device) if log_gate is None else log_gate
    bt = beta if isinstance(beta, torch.Tensor) else torch.full(shape, float(beta), dtype=q.dtype, device=q.device)
    return g, bt


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, log_gate: torch.Tensor | None, beta: float | torch.Tensor, qk_l2norm: bool,
    chunk_size: int,
) -> torch.Tensor:
    h, n = q.shape[1], q.shape[2]
    qs, kn = qk_normed(q, repeat_kv(k, h), scale, qk_l2norm)
    vr = repeat_kv(v, h)
    g, bt = _gates(q, log_gate, beta)
    g, bt = g.to(q.dtype), bt.to(q.dtype)
    big_g = g.cumsum(-1)
    seen = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    gamma = torch.exp((big_g[..., :, None] - big_g[..., None, :]).masked_fill(~seen, float("-inf")))
    a = (bt[..., :, None] * (kn @ kn.transpose(-1, -2)) * gamma).tril(-1)
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    u = torch.linalg.solve_triangular(eye + a, bt[..., None] * vr, upper=False)
    return ((qs @ kn.transpose(-1, -2)) * gamma) @ u


def _fast_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, p: dict[str, Any],
) -> tuple[torch.Tensor, ...]:
    h = q.shape[1]
    qs, kn = qk_normed(q, k, scale, p["qk_l2norm"])
    g, bt = _gates(q, p["log_gate"], p["beta"])
    return qs, repeat_kv(kn, h), repeat_kv(v, h), g, bt


def torch_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    return delta_scan.chunked(*_fast_inputs(q, k, v, scale, params), chunk=params["chunk_size"])[0]


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **params: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal forward over a prompt (validated parameters); returns ``(out, state)`` to continue with a step."""
    return delta_scan.chunked(*_fast_inputs(q, k, v, scale, params), chunk=params["chunk_size"])


def decode_step(
    state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **params: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token ``q (B, H, 1, D)`` (validated parameters, gates ``(B, H, 1)``); ``state=None`` starts a sequence."""
    inputs = _fast_inputs(q, k, v, scale, params)
    if state is None:
        b, h, _, dk = q.shape
        state = torch.zeros(b, h, dk, v.shape[-1], dtype=linear_scan.accumulation_dtype(q.dtype), device=q.device)
    return delta_scan.step(state, *inputs)


DECODER = Decoder(decode_prefill, decode_step, token_params=("log_gate", "beta"))

register(SPEC, reference, [Backend("torch", torch_chunked)], DECODER)
