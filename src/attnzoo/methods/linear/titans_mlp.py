"""L12 — Titans' deep neural memory: a two-layer MLP learned at test time, with Miras' attentional biases.

Paper: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni, arXiv:2501.00663), §3.1 ("Memory
Architecture": MLPs with ``L_M ≥ 2`` layers, the paper's default, more expressive than a matrix) and §3.2 (the chunked,
mini-batch training of the memory: "the process for MLPs with ``N_p ≥ 2`` is similar"). Everything else is the linear
memory's definition (:mod:`attnzoo.methods.linear.titans`: gates, chunks, retrieval after the update, ``loss``), with
the memory ``M(x) = SiLU(x W₁) W₂`` (``W₁ (Dk, E)``, ``W₂ (E, Dv)`` per query head, ``E = expansion · Dk``)::

    u_t = ∇_W ℓ(M_{W₀}(k̂_t), v_t)          (gradient at the chunk-start weights W₀, for both layers)
    S_t = η_t S_{t−1} − θ_t u_t,   W_t = (1 − α_t) W_{t−1} + S_t,   o_t = M_{W_t}(scale · q̂_t)

Choices: SiLU between the layers and no residual or norm inside the memory (Titans §4.4 uses SiLU for its projections;
the paper does not fix the memory's activation; lucidrains' ``MemoryMLP`` uses GELU, Miras adds a residual and
LayerNorm); ``expansion = 2`` (lucidrains' default); the initial weights ``memory_w1``, ``memory_w2`` are learnable per
head (the outer loop learns ``M₀``; ``az.nn.Attention`` owns them) — given none, fixed pseudo-random ones (seed 0,
``N(0, 1/Dk)`` and ``N(0, 1/E)``), since a zero MLP has zero gradients and never learns.

Reference (:func:`reference`): a loop over tokens whose inner gradients come from ``torch.func.grad`` of the inner
loss (the loss itself: ``½e²``, Huber, ``|e|^p / p``), independent of the fast path's hand-derived gradients. Fast path
``torch``: :func:`attnzoo.kernels.memory_scan.chunked_mlp` — each layer is a linear memory written by its own keys and
rows, so a query reads both with the linear chunk formula and the per-token weights are never formed. Decoding: the
state holds both layers' weights, momenta and chunk-start weights (fixed size); one or several tokens per step continue
the chunked form. Ragged prompts are refused (as for ``titans``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.kernels import memory_scan
from attnzoo.methods.common import repeat_kv
from attnzoo.methods.linear import titans
from attnzoo.methods.linear.common import qk_normed
from attnzoo.registry import Backend, Call, Decoder, LayerInfo, MethodSpec, Param, TestHints, register

DEFAULT_SEED = 0


def _hidden(call: Call) -> int:
    expansion = call.params.get("expansion", 2)
    return expansion * call.head_dim if isinstance(expansion, int) else -1


def _check_w1(value: Any, call: Call) -> str | None:
    expected = (call.heads, call.head_dim, _hidden(call))
    return None if tuple(value.shape) == expected else f"a (heads, head_dim, expansion·head_dim) tensor {expected}"


def _check_w2(value: Any, call: Call) -> str | None:
    expected = (call.heads, _hidden(call), call.head_dim_v)
    return None if tuple(value.shape) == expected else f"a (heads, expansion·head_dim, head_dim_v) tensor {expected}"


def _init_w1(layer: LayerInfo) -> torch.Tensor:
    hidden = layer.params.get("expansion", 2) * layer.head_dim
    return torch.randn(layer.heads, layer.head_dim, hidden) / math.sqrt(layer.head_dim)


def _init_w2(layer: LayerInfo) -> torch.Tensor:
    hidden = layer.params.get("expansion", 2) * layer.head_dim
    return torch.randn(layer.heads, hidden, layer.head_dim) / math.sqrt(hidden)


def _sample(call: Call, gen: torch.Generator) -> dict[str, Any]:
    e = 2 * call.head_dim
    weights = {"memory_w1": torch.randn(call.heads, call.head_dim, e, generator=gen) / math.sqrt(call.head_dim),
               "memory_w2": torch.randn(call.heads, e, call.head_dim_v, generator=gen) / math.sqrt(e)}
    sampled = titans.SPEC.tests.sample_params(call, gen)  # type: ignore[misc]
    # a tenth of the linear memory's learning rates: the MLP's unnormalised hidden layer makes larger steps diverge
    weights = {n: w.to(call.device, call.dtype) for n, w in weights.items()}
    return {**sampled, "theta": 0.1 * sampled["theta"], **weights}


SPEC = MethodSpec(
    name="titans_mlp",
    family="linear",
    mechanism="L12",
    paper="Titans: Learning to Memorize at Test Time (deep memory, with Miras' attentional biases)",
    arxiv="2501.00663",
    summary="two-layer MLP memory learned at test time by chunked gradient descent with momentum and forgetting, "
            "o_t = M_{W_t}(q_t)",
    exact=True,
    patterns=frozenset({"self/causal"}),
    params=(
        *titans.SPEC.params,
        Param("expansion", (int,), 2, "hidden width of the memory MLP, in multiples of the head dim", low=1),
        Param("memory_w1", (torch.Tensor,), None, "initial first-layer weights (H, Dk, E); None: fixed (seed 0)",
              check=_check_w1, init=_init_w1),
        Param("memory_w2", (torch.Tensor,), None, "initial second-layer weights (H, E, Dv); None: fixed (seed 0)",
              check=_check_w2, init=_init_w2),
    ),
    complexity="O(N·C·(C+E) + N·D·E) time, O(N·(C+E)) memory; decoding O(D·E) per token",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample, atol=1e-4, rtol=1e-3),
)


def _initial(q: torch.Tensor, dv: int, expansion: int, w1: torch.Tensor | None,
             w2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory's initial weights per head: the given ones, else fixed pseudo-random ones (seed 0)."""
    if w1 is not None and w2 is not None:
        return w1, w2
    h, dk = q.shape[1], q.shape[-1]
    e = expansion * dk
    gen = torch.Generator().manual_seed(DEFAULT_SEED)
    first = torch.randn(h, dk, e, generator=gen, dtype=torch.float64) / math.sqrt(dk)
    second = torch.randn(h, e, dv, generator=gen, dtype=torch.float64) / math.sqrt(e)
    return (first.to(q.device, q.dtype) if w1 is None else w1), (second.to(q.device, q.dtype) if w2 is None else w2)


def _inner_loss(err: torch.Tensor, loss: str, delta: float | torch.Tensor, p: float) -> torch.Tensor:
    """The inner loss itself (whose gradient in the prediction is ``memory_scan.loss_gradient``), summed."""
    if loss == "l2":
        return 0.5 * err.square().sum()
    if loss == "huber":
        mag = err.abs()
        return torch.where(mag <= delta, 0.5 * err.square(), delta * (mag - 0.5 * delta)).sum()
    return err.abs().pow(p).sum() / p


def _memory(weights: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``M(x) = SiLU(x W₁) W₂`` for one token per (batch, head): ``x (B, H, Dk)`` → ``(B, H, Dv)``."""
    hidden = F.silu(torch.einsum("bhd,bhde->bhe", x, weights[0]))
    return torch.einsum("bhe,bhef->bhf", hidden, weights[1])


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, eta: float | torch.Tensor, theta: float | torch.Tensor, alpha: float | torch.Tensor,
    loss: str, delta: float | torch.Tensor, p: float, qk_l2norm: bool, chunk_size: int, expansion: int,
    memory_w1: torch.Tensor | None, memory_w2: torch.Tensor | None,
) -> torch.Tensor:
    b, h, n, _ = q.shape
    qs, kn = qk_normed(q, repeat_kv(k, h), scale, qk_l2norm)
    vr = repeat_kv(v, h)
    gates = titans.gates_of(q, {"eta": eta, "theta": theta, "alpha": alpha})
    w1, w2 = _initial(q, v.shape[-1], expansion, memory_w1, memory_w2)
    weights = (w1.expand(b, *w1.shape), w2.expand(b, *w2.shape))
    momenta = (torch.zeros_like(weights[0]), torch.zeros_like(weights[1]))
    outs = []
    for t in range(n):
        if t % chunk_size == 0:
            chunk_start = weights  # every gradient of this chunk is taken here
        threshold = delta[:, :, t, None] if isinstance(delta, torch.Tensor) else delta

        def inner(ws: tuple[torch.Tensor, torch.Tensor], t: int = t, threshold: Any = threshold) -> torch.Tensor:
            return _inner_loss(_memory(ws, kn[:, :, t]) - vr[:, :, t], loss, threshold, p)

        grads = torch.func.grad(inner)(chunk_start)  # per (batch, head): the sum separates
        eta_t, theta_t, alpha_t = (g[:, :, t, None, None] for g in gates)
        momenta = tuple(eta_t * s - theta_t * g for s, g in zip(momenta, grads, strict=True))
        weights = tuple((1.0 - alpha_t) * w + s for w, s in zip(weights, momenta, strict=True))
        outs.append(_memory(weights, qs[:, :, t]))  # type: ignore[arg-type]
    return torch.stack(outs, dim=2)


def _chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, params: dict[str, Any],
    state: memory_scan.DeepMemoryState | None = None,
) -> tuple[torch.Tensor, memory_scan.DeepMemoryState]:
    h = q.shape[1]
    w1, w2 = _initial(q, v.shape[-1], params["expansion"], params["memory_w1"], params["memory_w2"])
    return memory_scan.chunked_mlp(
        q, titans.heads_of(k, h), titans.heads_of(v, h), *titans.gates_of(q, params), w1, w2,
        chunk=params["chunk_size"], state=state, features=titans.maps(scale, params["qk_l2norm"]),
        **titans.loss_of(params))


def torch_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    return _chunked(q, k, v, scale, params)[0]


def _empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict[str, Any]) -> None:
    return None  # the kernel starts from the initial weights


def _advance(
    state: memory_scan.DeepMemoryState | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    params: dict[str, Any],
) -> tuple[torch.Tensor, memory_scan.DeepMemoryState]:
    """A prompt, or ``T ≥ 1`` more tokens, through the chunked form from ``state``."""
    return _chunked(q, k, v, scale, params, state)


DECODER = Decoder.advancing(_empty, _advance, token_params=titans.DECODER.token_params, chunked=True)

register(SPEC, reference, [Backend("torch", torch_chunked)], DECODER)
