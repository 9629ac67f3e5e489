"""Pieces the L-family method files share: call resolution for the recurrent (prefill/step) API, decay defaults.

Every L method file exposes, besides its registered reference and fast paths, a decoding API::

    out, state = prefill(q, k, v, scale=None, **params)      # causal, whole prompt, chunked; returns the state
    out_t, state = step(state, q_t, k_t, v_t, scale=None, **params)   # one token (seq 1), fixed-size state

``state=None`` in ``step`` starts an empty sequence. ``prefill`` followed by ``step`` gives the same outputs as the
full causal forward over the concatenated sequence. Parameters are validated exactly as ``attnzoo.attention`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.api import prepare
from attnzoo.registry import get


def resolve(
    method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, params: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """Validate a causal self-attention call of ``method``; return its resolved scale and all its parameters."""
    _, scale_, _, _, full = prepare(get(method), q, k, v, True, scale, None, None, params)
    return scale_, full


def alibi_rates(heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-head decay rates ``s_h = 2^(−8(h+1)/H)`` (the ALiBi slopes TransNormerLLM uses for its decay)."""
    return torch.pow(2.0, -8.0 * torch.arange(1, heads + 1, device=device, dtype=dtype) / heads)
