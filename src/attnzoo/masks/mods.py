"""Score modifiers (FlexAttention ``score_mod``s): ALiBi, logit soft-capping, an additive bias, a boolean mask.

In the style of attention-gym's ``mods/``: each builder returns ``score_mod(score, b, h, q_idx, kv_idx)``, the logit
after the modification, written with elementwise tensor ops so that FlexAttention compiles it into its kernel.
Values that change between calls (cap, slopes, bias) are closed over as *tensors*, never Python floats: the compiled
kernel is then reused for new values instead of compiled anew.

- :func:`alibi` — "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation" (Press,
  Smith, Lewis; arXiv:2108.12409): ``score − m_h · |i + offset − j|`` with the paper's slopes :func:`alibi_slopes`
  (``offset = seq_kv − seq_q`` aligns queries bottom-right, as the causal mask does);
- :func:`softcap` — Gemma 2 (arXiv:2408.00118): ``cap · tanh(score / cap)``;
- :func:`additive` and :func:`masked` — a dense ``(B, H, Sq, Skv)`` bias added to, or boolean mask applied to, the
  logits;
- :func:`compose` — several modifiers applied in order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["ScoreMod", "additive", "alibi", "alibi_slopes", "compose", "masked", "softcap"]

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``score_mod(score, b, h, q_idx, kv_idx) -> score``: FlexAttention's logit modifier."""


def alibi_slopes(heads: int) -> list[float]:
    """The ALiBi paper's head slopes for ``heads`` heads.

    For ``H`` a power of two, ``m_h = 2^(−8(h+1)/H)``, h = 0…H−1 (for H = 8: 1/2, 1/4, …, 1/256); otherwise the
    paper's recipe: the slopes of the nearest lower power of two ``P`` followed by every other slope of ``2P``.
    """

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    power = 2 ** math.floor(math.log2(heads))
    if power == heads:
        return geometric(heads)
    return geometric(power) + geometric(2 * power)[0::2][: heads - power]


def alibi(slopes: torch.Tensor, offset: int) -> ScoreMod:
    """ALiBi with per-head ``slopes (H,)``: ``score − slopes[h] · |q_idx + offset − kv_idx|``."""

    def alibi_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                  kv_idx: torch.Tensor) -> torch.Tensor:
        return score - slopes[h] * torch.abs(q_idx + offset - kv_idx)

    return alibi_mod


def softcap(cap: torch.Tensor) -> ScoreMod:
    """Logit soft-capping with a 0-d tensor ``cap``: ``cap · tanh(score / cap)``."""

    def softcap_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                    kv_idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(score / cap) * cap

    return softcap_mod


def additive(bias: torch.Tensor) -> ScoreMod:
    """``score + bias[b, h, q_idx, kv_idx]`` for a ``(B, H, Sq, Skv)`` bias (an expanded view is enough)."""

    def additive_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                     kv_idx: torch.Tensor) -> torch.Tensor:
        return score + bias[b, h, q_idx, kv_idx]

    return additive_mod


def masked(mask: torch.Tensor) -> ScoreMod:
    """``score`` where ``mask[b, h, q_idx, kv_idx]`` is True, −inf elsewhere, for a ``(B, H, Sq, Skv)`` bool mask."""

    def masked_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                   kv_idx: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[b, h, q_idx, kv_idx], score, float("-inf"))

    return masked_mod


def compose(*score_mods: ScoreMod) -> ScoreMod:
    """The modifiers applied in the order given (the first one sees the raw logit)."""

    def composed_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                     kv_idx: torch.Tensor) -> torch.Tensor:
        for mod in score_mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    return composed_mod
