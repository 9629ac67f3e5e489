"""Log-sum-exp merge of partial softmax attention results.

Attention over a key set split into disjoint parts ``K = K_1 ∪ … ∪ K_m`` is recovered exactly from each part's
normalised output ``O_i`` and log-sum-exp ``L_i = log Σ_{j∈K_i} exp(s_j)``:
``L = log Σ_i exp(L_i)``, ``O = Σ_i exp(L_i − L) · O_i``. A part with no visible key has ``L_i = −inf`` and weight 0;
a row with no visible key anywhere gives ``O = 0`` and ``L = −inf`` (never NaN, forward or backward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge(outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial outputs ``(..., S, Dv)`` with their log-sum-exps ``(..., S)``; returns ``(output, lse)``."""
    if len(outputs) != len(lses) or not outputs:
        raise ValueError("outputs and lses: expected equally many (at least one)")
    lse = torch.stack(list(lses), dim=0)
    total = torch.logsumexp(lse, dim=0)
    finite_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(lse - finite_total)  # exp(-inf) = 0 for empty parts, no NaN in the gradient
    out = sum(w.unsqueeze(-1) * o for w, o in zip(weights, outputs, strict=False))
    return out, total
