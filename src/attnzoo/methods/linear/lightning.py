"""L2 — Lightning Attention (1 and 2): causal linear attention with a per-head exponential decay.

Papers: "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention" (Qin et al.,
arXiv:2405.17381, Lightning Attention-2) and "TransNormerLLM: A Faster and Better Large Language Model with Improved
TransNormer" (Qin et al., arXiv:2307.14995), whose decayed linear attention Lightning Attention computes.

Formula as implemented (causal self-attention only)::

    O = ((scale · Q Kᵀ) ⊙ M) V,    M_ij = exp(−s_h · (i − j)) for j ≤ i, 0 otherwise

with ``s_h = decay`` the per-head rate: a float (all heads), a tensor of ``heads`` non-negative rates, or None for
the default ``s_h = 2^(−8h/H)``, h = 1..H (the ALiBi slopes TransNormerLLM builds its decay from, at layer 0). No
row normalisation and no feature map: in TransNormerLLM the activation of Q, K and the output norm belong to the layer
around the kernel. Choice: ``scale`` (default ``1/√D``) multiplies the scores as everywhere in attnzoo; pass
``scale=1.0`` for the paper's unscaled form. GQA: each query head keeps its own decayed state.

Layer: ``attnzoo.nn.Attention(..., method="lightning")`` builds TransNormerLLM's layer around this kernel
(:mod:`attnzoo.nn.layers.lightning`: SiLU on q and k, SRMSNorm of the output times the gate ``U = x W_u``; per-layer
decay rates from ``transnormer_decay``); ``faithful=False`` gives the bare kernel.

Fast path ``torch`` (:func:`torch_blocked`): the Lightning Attention-2 tiling in PyTorch, via
:mod:`attnzoo.kernels.linear_scan`: blocks of ``block_size`` tokens; inside a block the masked, decayed ``(QKᵀ ⊙ D)V``;
across blocks a running ``KᵀV`` state decayed by ``λ^B`` per block (``λ = exp(−s)``), queries weighted by ``λ^{t+1}``
and keys by ``λ^{B−1−t}``, so no factor ever exceeds 1 and there is no cumulative sum over the whole sequence. All
blocks are batched matmuls; only the ``D×Dv`` state recurrence is a loop over blocks. Time O(N·B·D + N·D²), memory O(N).
Recurrent form: :func:`prefill` and :func:`step`, state ``(B, H, D, Dv)``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from attnzoo.kernels import linear_scan
from attnzoo.methods.common import dense_scores, repeat_kv, visible
from attnzoo.methods.linear.common import alibi_rates
from attnzoo.registry import Backend, Call, Decoder, MethodSpec, Param, TestHints, register


def _check_decay(value: Any, call: Call) -> str | None:
    if isinstance(value, torch.Tensor):
        if value.shape not in ((call.heads,), ()):
            return f"a float or a tensor of {call.heads} per-head rates"
        if value.is_floating_point() is False or bool((value < 0).any()) or not bool(torch.isfinite(value).all()):
            return "finite non-negative rates"
    return None


SPEC = MethodSpec(
    name="lightning",
    family="linear",
    mechanism="L2",
    paper="Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
    arxiv="2405.17381",
    summary="((QKᵀ·scale) ⊙ M)V with M_ij = exp(−s_h(i−j)), j ≤ i; blockwise intra + decayed inter-block state",
    exact=True,
    patterns=frozenset({"self/causal"}),
    params=(
        Param("decay", (float, torch.Tensor), None, "per-head rate s ≥ 0 (float or (heads,) tensor); None: 2^(−8h/H)",
              low=0.0, check=_check_decay),
        Param("block_size", (int,), 128, "tokens per block of the tiled scan", low=1),
    ),
    complexity="O(N·(B+D)·D) time, O(N) memory; decoding O(D·Dv) per token",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=lambda call, gen: {"decay": torch.rand(call.heads, generator=gen).to(call.device)}),
)


def rates(decay: float | torch.Tensor | None, heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The ``(heads,)`` decay rates of a call."""
    if decay is None:
        return alibi_rates(heads, device, dtype)
    if isinstance(decay, torch.Tensor):
        return decay.to(dtype).expand(heads)
    return torch.full((heads,), float(decay), device=device, dtype=dtype)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, decay: float | torch.Tensor | None, block_size: int,
) -> torch.Tensor:
    n = q.shape[2]
    s = rates(decay, q.shape[1], q.device, q.dtype)
    i = torch.arange(n, device=q.device, dtype=q.dtype)
    dist = (i[:, None] - i[None, :]).clamp_min(0)
    m = torch.exp(-s[:, None, None] * dist) * visible(True, None, q, k)
    return (dense_scores(q, k, scale) * m) @ repeat_kv(v, q.shape[1])


def torch_blocked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, decay: float | torch.Tensor | None, block_size: int,
) -> torch.Tensor:
    s = rates(decay, q.shape[1], q.device, linear_scan.accumulation_dtype(q.dtype))
    # the scale is applied per chunk group inside the scan (no sequence-wide scaled copy of q)
    maps = (functools.partial(torch.mul, other=scale), _unchanged)
    return linear_scan.causal(q, k, v, decay=s, chunk=block_size, features=maps)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def decode_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, decay: float | torch.Tensor | None,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal forward over a prompt (validated parameters); returns ``(out, state)`` to continue with a step."""
    s = rates(decay, q.shape[1], q.device, linear_scan.accumulation_dtype(q.dtype))
    out, state = linear_scan.causal(q * scale, k, v, decay=s, chunk=block_size, return_state=True)
    return out, state


def decode_step(
    state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    decay: float | torch.Tensor | None, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token ``q (B, H, 1, D)`` (validated parameters); ``state=None`` starts a new sequence."""
    s = rates(decay, q.shape[1], q.device, linear_scan.accumulation_dtype(q.dtype))
    if state is None:
        state = linear_scan.empty_state(q, k, v, decay=s, normalize=False)
    return linear_scan.step(state, q * scale, k, v, decay=s)


DECODER = Decoder(decode_prefill, decode_step)

register(SPEC, reference, [Backend("torch", torch_blocked)], DECODER)
