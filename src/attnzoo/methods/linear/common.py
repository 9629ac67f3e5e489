"""Pieces the L-family method files share: call resolution for the recurrent (prefill/step) API, decay defaults.

Every L method file defines, besides its registered reference and fast paths, a decoding API as two module-level
functions (those whose fast path is a plain feature-map scan call :func:`feature_prefill` and :func:`feature_step`)::

    out, state = prefill(q, k, v, scale=None, **params)      # causal, whole prompt, chunked; returns the state
    out_t, state = step(state, q_t, k_t, v_t, scale=None, **params)   # one token (seq 1), fixed-size state

``state=None`` in ``step`` starts an empty sequence. ``prefill`` followed by ``step`` gives the same outputs as the
full causal forward over the concatenated sequence. Parameters are validated exactly as ``attnzoo.attention`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.api import prepare
from attnzoo.kernels import linear_scan
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


def feature_prefill(
    qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, chunk: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``prefill`` of a method whose fast path is :func:`linear_scan.causal` on feature maps ``qf``/``kf`` (no
    decay): the causal output and the state to continue from."""
    out, state = linear_scan.causal(qf, kf, v, chunk=chunk, normalize=normalize, return_state=True)
    return out, state


def feature_step(
    state: torch.Tensor | None, qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, *, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``step`` of such a method for one token's feature maps; ``state=None`` starts a new sequence."""
    if state is None:
        state = linear_scan.empty_state(qf, kf, v, decay=None, normalize=normalize)
    return linear_scan.step(state, qf, kf, v, normalize=normalize)
