"""Pieces the L-family method files share: the decoder halves of feature-map methods, decay defaults, the
query/key L2 normalisation of the delta-rule family.

Every causal L method registers a :class:`~attnzoo.registry.Decoder` (``DECODER`` in its file: module-level
``decode_prefill``/``decode_step``), which ``attnzoo.prefill``/``attnzoo.step`` validate and run::

    out, state = attnzoo.prefill(q, k, v, method="linear", **params)   # causal, whole prompt, chunked
    out_t, state = attnzoo.step(state, q_t, k_t, v_t)                  # next tokens, fixed-size state

``prefill`` followed by ``step`` gives the same outputs as the full causal forward over the concatenated sequence.
"""

from __future__ import annotations

import torch

from attnzoo.kernels import linear_scan

NORM_EPS = 1e-6


def l2_normed(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(|x|² + 1e-6)`` along the last dim."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + NORM_EPS)


def qk_normed(q: torch.Tensor, k: torch.Tensor, scale: float, on: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale · q̂, k̂)`` with ``x̂`` :func:`l2_normed` when ``on`` (Gated DeltaNet's and Titans' ``qk_l2norm``),
    else ``(scale · q, k)``."""
    if on:
        q, k = l2_normed(q), l2_normed(k)
    return q * scale, k


def alibi_rates(heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-head decay rates ``s_h = 2^(−8(h+1)/H)`` (the ALiBi slopes TransNormerLLM uses for its decay)."""
    return torch.pow(2.0, -8.0 * torch.arange(1, heads + 1, device=device, dtype=dtype) / heads)


def feature_prefill(
    qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, chunk_size: int, normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder prefill of a method whose fast path is :func:`linear_scan.causal` on feature maps (no decay): the
    chunked causal scan over the prompt's features, returning its final state."""
    return linear_scan.causal(qf, kf, v, chunk=chunk_size, normalize=normalize, return_state=True)


def feature_step(
    state: torch.Tensor | None, qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder step of such a method on one token's features; ``state=None`` starts an empty sequence."""
    if state is None:
        state = linear_scan.empty_state(qf, kf, v, decay=None, normalize=normalize)
    return linear_scan.step(state, qf, kf, v, normalize=normalize)
