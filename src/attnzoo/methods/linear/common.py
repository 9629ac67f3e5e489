"""Pieces the L-family method files share: call resolution for the recurrent (prefill/step) API, decay defaults.

Every L method file exposes, besides its registered reference and fast paths, a decoding API::

    out, state = prefill(q, k, v, scale=None, **params)      # causal, whole prompt, chunked; returns the state
    out_t, state = step(state, q_t, k_t, v_t, scale=None, **params)   # one token (seq 1), fixed-size state

``state=None`` in ``step`` starts an empty sequence. ``prefill`` followed by ``step`` gives the same outputs as the
full causal forward over the concatenated sequence. Parameters are validated exactly as ``attnzoo.attention`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attnzoo.api import prepare
from attnzoo.kernels import linear_scan
from attnzoo.registry import get

Features = Callable[[torch.Tensor, torch.Tensor, float, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
Decoding = tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], Callable[..., tuple[torch.Tensor, torch.Tensor]]]


def resolve(
    method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, params: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """Validate a causal self-attention call of ``method``; return its resolved scale and all its parameters."""
    _, scale_, _, _, full = prepare(get(method), q, k, v, True, scale, None, None, params)
    return scale_, full


def alibi_rates(heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-head decay rates ``s_h = 2^(−8(h+1)/H)`` (the ALiBi slopes TransNormerLLM uses for its decay)."""
    return torch.pow(2.0, -8.0 * torch.arange(1, heads + 1, device=device, dtype=dtype) / heads)


def feature_map_decoding(method: str, features: Features, normalized: Callable[[dict[str, Any]], bool]) -> Decoding:
    """``(prefill, step)`` of a method whose fast path is :func:`linear_scan.causal` on feature maps (no decay).

    ``features(q, k, scale, params)`` gives ``(qf, kf)``; ``normalized(params)`` says whether the scan normalises.
    """

    def prefill(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, **params: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal forward over a prompt; returns ``(out, state)`` to continue with ``step``."""
        scale_, p = resolve(method, q, k, v, scale, params)
        qf, kf = features(q, k, scale_, p)
        out, state = linear_scan.causal(qf, kf, v, chunk=p["chunk_size"], normalize=normalized(p), return_state=True)
        return out, state

    def step(
        state: torch.Tensor | None,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        **params: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step for one token ``q (B, H, 1, D)``; ``state=None`` starts a new sequence."""
        scale_, p = resolve(method, q, k, v, scale, params)
        qf, kf = features(q, k, scale_, p)
        if state is None:
            state = linear_scan.empty_state(qf, kf, v, decay=None, normalize=normalized(p))
        return linear_scan.step(state, qf, kf, v, normalize=normalized(p))

    return prefill, step
