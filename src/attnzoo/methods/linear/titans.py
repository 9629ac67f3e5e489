"""L12 — Titans' neural long-term memory (linear memory), with Miras' attentional biases.

Papers: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni, arXiv:2501.00663), §3.1 eqs. (12)–(15)
and §3.2 eqs. (16)–(18); "It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention,
and Online Optimization" (Miras; Behrouz, Razaviyayn, Zhong, Mirrokni, arXiv:2504.13173), §5.1 (ℓp and Huber biases,
Moneta and Yaad). Public code read for the conventions (not copied): lucidrains/titans-pytorch (``neural_memory.py``)
and fla-org/flash-linear-attention (``fla/ops/titans/naive.py``).

The memory is a matrix ``M (Dk, Dv)`` per query head, learned while reading the sequence: each token's key/value pair is
a training example of the inner loss ``ℓ(M; k, v)`` (the attentional bias), optimised by gradient descent with momentum
and weight decay. As implemented (per head; the sequence cut into chunks of ``chunk_size`` tokens from its first
token, ``M₀`` the memory at the start of token ``t``'s chunk)::

    e_t = M₀ᵀ k̂_t − v_t,        u_t = k̂_t φ(e_t)ᵀ                       (gradient of ℓ at M₀)
    S_t = η_t S_{t−1} − θ_t u_t,  M_t = (1 − α_t) M_{t−1} + S_t,        o_t = M_tᵀ (scale · q̂_t)

``q̂, k̂ = x / sqrt(|x|² + 1e-6)`` when ``qk_l2norm=True`` (default; Titans §4.4 normalises queries and keys with the
ℓ2 norm), else the raw vectors. ``φ`` is the gradient of the chosen inner ``loss`` with respect to ``M(k)``:

- ``"l2"`` (Titans, eq. 12): ``½‖M(k) − v‖²``, ``φ(e) = e``. The paper writes ``‖·‖²`` and its gradient as
  ``(W₀x − x)xᵀ`` (eq. 17), without the 2: the factor is absorbed into ``θ``.
- ``"huber"`` (Miras, coordinate-wise Huber, eq. 14's first variant): ``Σ_j H_δ(e_j)``, ``φ(e) = clamp(e, −δ, δ)``;
  ``delta`` a float or a ``(B, H, S)`` tensor (Yaad makes it data-dependent). A huge ``δ`` is ``"l2"``.
- ``"lp"`` (Moneta): ``(1/p)‖e‖_p^p``, ``φ(e) = sign(e)|e|^{p−1}`` (Miras writes ``‖e‖_p^p``; its factor ``p`` is
  absorbed into ``θ``, so ``p = 2`` is ``"l2"``); ``p ≥ 1`` (Moneta uses 3; ``p = 1`` is the sign).
- ``"huber_switch"`` (Yaad, Miras eq. 26): ``φ(e) = e`` while ``‖e‖₂ ≤ δ``, else ``δ·sign(e)`` (a switch on the whole
  error's norm between the ℓ2 gradient and δ times the ℓ1 one); with ``eta=0`` this is ``method="yaad"``.

Definition choices:

- **Chunks are part of the definition** (Titans §3.2, eq. 16 with ``t' = t − mod(t, b)``): within a chunk every gradient
  is taken at the chunk-start memory (mini-batch gradient descent), while momentum, decay and retrieval stay per
  token. ``chunk_size=1`` is the exact token-by-token recurrence of eqs. (13)–(14); larger chunks train faster and
  give a (slightly) different model. Chunk boundaries are at multiples of ``chunk_size`` from the first token.
- **Retrieval reads ``M_t``**, the memory after token ``t``'s own update (the paper's ``y_t = M*(q_t)``, "the forward
  pass without weight update"; as in fla's implementation and in linear attention), so the method is causal self-
  attention with the diagonal included.
- **Gates are inputs**: ``eta`` (momentum decay η ∈ [0, 1]), ``theta`` (learning rate θ ≥ 0) and ``alpha``
  (forgetting α ∈ [0, 1]), each a float or a ``(B, H, S)`` tensor, per query head and token as in the paper's
  experiments ("we make these parameters as the functions of tokens"). The layer
  (:mod:`attnzoo.nn.layers.titans`) computes them from the input.
- ``scale`` multiplies the query, as in the library's other linear methods (the paper has no scale; with the layer's
  output norm it cancels). The retention gate is Titans' (ℓ2 weight decay ``1 − α``); Miras' ℓq and KL retention gates
  are the methods ``moneta`` and ``memora`` (:mod:`attnzoo.methods.linear.miras`); elastic net is not implemented.
- Memory ``M₀ = 0`` at the start of a sequence (the paper learns ``M₀`` in the outer loop only for deep memories).

Reference (:func:`reference`): a plain loop over tokens in the input dtype, exactly the recurrence above (O(N·D²),
sequential). Fast path ``torch``: :mod:`attnzoo.kernels.memory_scan` (chunked matmul form, a loop over chunks only),
O(N·C·(C + D) + N·D²) time, linear in N. GQA: key/value heads are repeated to the query heads (each query head has its
own gates, hence its own memory). Decoding (:data:`DECODER`): the state holds ``M``, ``S``, the chunk-start memory and
the position in the chunk (fixed size); a prompt then steps (one token or several) equals one forward. Ragged prompts
(``prefill(..., lengths=)``) are refused: sequences of different lengths sit at different chunk positions.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.kernels import memory_scan
from attnzoo.kernels.linear_scan import FeatureMaps
from attnzoo.kernels.memory_scan import LOSSES, loss_gradient
from attnzoo.methods.common import repeat_kv
from attnzoo.methods.linear.common import l2_normed, qk_normed
from attnzoo.registry import Backend, Call, Decoder, MethodSpec, Param, TestHints, register

GATES = ("eta", "theta", "alpha")


def _per_token(name: str, low: float, high: float, low_open: bool = False) -> Any:
    """A check of a parameter that is a float or a ``(B, H, S)`` tensor of values in ``[low, high]``."""

    def check(value: Any, call: Call) -> str | None:
        if isinstance(value, torch.Tensor):
            if tuple(value.shape) != (call.batch, call.heads, call.seq_q):
                return f"a float or a tensor of shape {(call.batch, call.heads, call.seq_q)} (batch, heads, seq)"
            above = value > low if low_open else value >= low
            if not value.is_floating_point() or not bool((above & (value <= high)).all()):
                return f"{name} values in {'(' if low_open else '['}{low}, {high}]"
        return None

    return check


def _sample(call: Call, gen: torch.Generator) -> dict[str, Any]:
    shape = (call.batch, call.heads, call.seq_q)
    values = {
        "eta": torch.sigmoid(torch.randn(shape, generator=gen) + 1.0),
        "theta": 0.5 * torch.sigmoid(torch.randn(shape, generator=gen)),
        "alpha": torch.sigmoid(torch.randn(shape, generator=gen) - 3.0),
        "delta": 0.5 + torch.rand(shape, generator=gen),
    }
    tensors = {n: t.to(call.device, call.dtype) for n, t in values.items()}
    return {**tensors, "loss": "huber", "chunk_size": 8}


SPEC = MethodSpec(
    name="titans",
    family="linear",
    mechanism="L12",
    paper="Titans: Learning to Memorize at Test Time (with Miras' attentional biases)",
    arxiv="2501.00663",
    summary="memory learned at test time: S_t = η_t S_{t−1} − θ_t ∇ℓ(M₀; k_t, v_t), M_t = (1−α_t)M_{t−1} + S_t, "
            "o_t = M_t(q_t); chunked mini-batch gradients",
    exact=True,
    patterns=frozenset({"self/causal"}),
    params=(
        Param("eta", (float, torch.Tensor), 0.9, "momentum decay η in [0, 1]: a float or a (B, H, S) tensor",
              low=0.0, high=1.0, check=_per_token("eta", 0.0, 1.0)),
        Param("theta", (float, torch.Tensor), 0.1, "learning rate θ ≥ 0: a float or a (B, H, S) tensor",
              low=0.0, check=_per_token("theta", 0.0, float("inf"))),
        Param("alpha", (float, torch.Tensor), 0.0, "forgetting α in [0, 1]: a float or a (B, H, S) tensor",
              low=0.0, high=1.0, check=_per_token("alpha", 0.0, 1.0)),
        Param("loss", (str,), "l2", "the memory's inner loss (attentional bias): l2, huber (δ), lp (p) or "
              "huber_switch (δ)", choices=LOSSES),
        Param("delta", (float, torch.Tensor), 1.0, "Huber threshold δ > 0: a float or a (B, H, S) tensor",
              low=0.0, low_open=True, check=_per_token("delta", 0.0, float("inf"), low_open=True)),
        Param("p", (float,), 3.0, "exponent of the lp loss, ≥ 1", low=1.0),
        Param("qk_l2norm", (bool,), True, "L2-normalise queries and keys (as the paper does)"),
        Param("chunk_size", (int,), 64, "tokens per chunk: gradients within a chunk are taken at the chunk-start "
              "memory (part of the definition; 1 = token-by-token)", low=1),
    ),
    complexity="O(N·C·(C+D) + N·D²) time, O(N·(C+D) + N·D²/C) memory; decoding O(D²) per token",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample, atol=1e-4, rtol=1e-3),
)


def gates_of(q: torch.Tensor, p: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """``eta, theta, alpha`` as ``(B, H, S)`` tensors (a float as an expanded scalar: no copy per token)."""
    shape = q.shape[:3]
    return tuple(p[n] if isinstance(p[n], torch.Tensor)
                 else torch.tensor(float(p[n]), dtype=q.dtype, device=q.device).expand(shape) for n in GATES)


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Key/value heads repeated to the query heads (each query head has its own memory); no copy without GQA."""
    return x if x.shape[1] == heads else repeat_kv(x, heads)


def maps(scale: float, l2norm: bool) -> FeatureMaps:
    """The per-token maps of queries and keys: ``(scale · q̂, k̂)`` (see ``qk_l2norm``)."""

    def query(x: torch.Tensor) -> torch.Tensor:
        return (l2_normed(x) if l2norm else x) * scale

    return query, (l2_normed if l2norm else _identity)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def loss_of(p: dict[str, Any]) -> dict[str, Any]:
    return {"loss": p["loss"], "delta": p["delta"], "p": p["p"]}


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, eta: float | torch.Tensor, theta: float | torch.Tensor, alpha: float | torch.Tensor,
    loss: str, delta: float | torch.Tensor, p: float, qk_l2norm: bool, chunk_size: int,
) -> torch.Tensor:
    b, h, n, dk = q.shape
    qs, kn = qk_normed(q, repeat_kv(k, h), scale, qk_l2norm)
    vr = repeat_kv(v, h)
    eta_, theta_, alpha_ = gates_of(q, {"eta": eta, "theta": theta, "alpha": alpha})
    memory = torch.zeros(b, h, dk, vr.shape[-1], dtype=q.dtype, device=q.device)
    momentum = torch.zeros_like(memory)
    outs = []
    for t in range(n):
        if t % chunk_size == 0:
            chunk_start = memory  # every gradient of this chunk is taken here
        k_t, v_t, q_t = kn[:, :, t], vr[:, :, t], qs[:, :, t]
        err = torch.einsum("bhd,bhde->bhe", k_t, chunk_start) - v_t
        threshold = delta[:, :, t, None] if isinstance(delta, torch.Tensor) else delta
        grad = torch.einsum("bhd,bhe->bhde", k_t, loss_gradient(err, loss, threshold, p))
        momentum = eta_[:, :, t, None, None] * momentum - theta_[:, :, t, None, None] * grad
        memory = (1.0 - alpha_[:, :, t, None, None]) * memory + momentum
        outs.append(torch.einsum("bhd,bhde->bhe", q_t, memory))
    return torch.stack(outs, dim=2)


def _chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, params: dict[str, Any],
    state: memory_scan.MemoryState | None = None,
) -> tuple[torch.Tensor, memory_scan.MemoryState]:
    h = q.shape[1]
    return memory_scan.chunked(q, heads_of(k, h), heads_of(v, h), *gates_of(q, params), chunk=params["chunk_size"],
                               state=state, features=maps(scale, params["qk_l2norm"]), **loss_of(params))


def torch_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    return _chunked(q, k, v, scale, params)[0]


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, **params: Any,
) -> tuple[torch.Tensor, memory_scan.MemoryState]:
    """Causal forward over a prompt (validated parameters); returns ``(out, state)`` to continue with a step."""
    return _chunked(q, k, v, scale, params)


def decode_step(
    state: memory_scan.MemoryState | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    **params: Any,
) -> tuple[torch.Tensor, memory_scan.MemoryState]:
    """``T ≥ 1`` tokens ``q (B, H, T, D)`` (validated parameters, per-token ones ``(B, H, T)``); ``state=None`` starts a
    sequence. One token runs the recurrence, several the chunked form from the state."""
    if q.shape[2] > 1:
        return _chunked(q, k, v, scale, params, state)
    b, h, _, dk = q.shape
    if state is None:
        state = memory_scan.empty_state(b, h, dk, v.shape[-1], q.dtype, q.device)
    qs, kn = qk_normed(q, heads_of(k, h), scale, params["qk_l2norm"])
    return memory_scan.step(state, qs, kn, heads_of(v, h), *gates_of(q, params), chunk=params["chunk_size"],
                            **loss_of(params))


DECODER = Decoder(decode_prefill, decode_step, token_params=(*GATES, "delta"), chunked=True)

register(SPEC, reference, [Backend("torch", torch_chunked)], DECODER)
