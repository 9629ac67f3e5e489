"""Log-sum-exp merge of partial softmax attention results.

Attention over a key set split into disjoint parts ``K = K_1 ∪ … ∪ K_m`` is recovered exactly from each part's
normalised output ``O_i`` and log-sum-exp ``L_i = log Σ_{j∈K_i} exp(s_j)``:
``L = log Σ_i exp(L_i)``, ``O = Σ_i exp(L_i − L) · O_i``. A part with no visible key has ``L_i = −inf`` and weight 0;
a row with no visible key anywhere gives ``O = 0`` and ``L = −inf`` (never NaN, forward or backward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnzoo.errors import fail


def merge(outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial outputs ``(..., S, Dv)`` with their log-sum-exps ``(..., S)``; returns ``(output, lse)``: the
    kernels' form of :func:`merge_parts` (parallel lists, no per-part checks), the same computation."""
    if len(outputs) != len(lses) or not outputs:
        raise ValueError("outputs and lses: expected equally many (at least one)")
    return _merged(list(outputs), list(lses))


def merge_parts(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Public log-sum-exp merge: ``parts`` is a list of ``(out_i (B, H, S, Dv), lse_i (B, H, S))``.

    Exact combination of attention computed over disjoint key sets (see the module docstring), computed as
    ``m = max_i L_i`` (treated as a constant: the result does not depend on it), ``w_i = exp(L_i − m)``,
    ``O = Σ_i w_i O_i / Σ_i w_i`` and ``L = m + log Σ_i w_i``. Choices:

    - fp16/bf16 inputs are accumulated in fp32; ``out`` comes back in the dtype of ``out_0``, ``lse`` in fp32
      (fp64 stays fp64);
    - a part whose ``lse`` is ``-inf`` contributes nothing; a row that is ``-inf`` in every part gives ``O = 0`` and
      ``L = -inf`` with finite (zero) gradients — the divisions and the log are guarded, not masked afterwards;
    - differentiable with respect to every ``out_i`` and ``lse_i``.

    >>> out, lse = merge_parts([(out_a, lse_a), (out_b, lse_b)])
    """
    return _merged(*_checked_parts(parts))


def _merged(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge of :func:`merge_parts` on checked outputs and log-sum-exps."""
    acc = torch.promote_types(lses[0].dtype, torch.float32)
    lse = torch.stack([x.to(acc) for x in lses], dim=0)
    top = lse.detach().amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lse - top)  # exp(-inf) = 0: an empty part weighs nothing
    total = weights.sum(dim=0)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    out = sum(w.unsqueeze(-1) * o.to(acc) for w, o in zip(weights, outs, strict=True)) / safe_total.unsqueeze(-1)
    merged_lse = torch.where(seen, top + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return out.to(outs[0].dtype), merged_lse


def _checked_parts(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split ``parts`` into outputs and log-sum-exps after checking that every part has the first part's shapes."""
    if not isinstance(parts, (list, tuple)) or not parts:
        got = f"an empty {type(parts).__name__}" if isinstance(parts, (list, tuple)) else type(parts).__name__
        raise fail("parts", "a non-empty list of (out, lse) pairs", got)
    outs, lses = [], []
    for i, part in enumerate(parts):
        if not isinstance(part, (list, tuple)) or len(part) != 2:
            raise fail(f"parts[{i}]", "an (out, lse) pair", type(part).__name__)
        out, lse = part
        if out.dim() < 1 or tuple(lse.shape) != tuple(out.shape[:-1]):
            shapes = f"{tuple(out.shape)} and {tuple(lse.shape)}"
            raise fail(f"parts[{i}]", "lse shaped like out without its last axis", shapes)
        if i and tuple(out.shape) != tuple(outs[0].shape):
            raise fail(f"parts[{i}]", f"out shaped {tuple(outs[0].shape)} (from parts[0])", tuple(out.shape))
        outs.append(out)
        lses.append(lse)
    return outs, lses
