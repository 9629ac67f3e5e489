"""Hedgehog's layer-level training: attention distillation of a layer's feature maps (L3,
:mod:`attnzoo.methods.linear.hedgehog`).

Paper: "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry" (Zhang et al.,
arXiv:2402.04347), §4: Hedgehog's feature maps ``φ_q, φ_k`` (per head, ``φ(x) = [exp(xW + b), exp(−xW − b)]``) are
trained so that the layer's linear attention weights match the softmax attention weights of the same queries and keys,
by a soft-label cross-entropy between the two attention maps.

``attnzoo.nn.Attention(..., method="hedgehog")`` already owns the four map tensors (``q_weight``, ``q_bias``,
``k_weight``, ``k_bias``: the method's learnable parameters, ``W = I, b = 0`` at first as in the paper), so no
:class:`~attnzoo.nn.layers.base.LayerParts` are registered; this module adds the paper's training of them on the
layer's own heads:

- :func:`distillation_loss`: ``KL(softmax(scale·q kᵀ) ‖ Hedgehog weights)`` averaged over query rows
  (:func:`attnzoo.methods.linear.hedgehog.softmax_kl`: the paper's cross-entropy less the softmax's entropy, a
  constant in the maps) on ``layer.project(x)``, with ``q`` and ``k`` detached so that its gradient reaches only the
  feature maps. Added to a task loss, it trains the maps by distillation while the task trains the projections (the
  paper's recipe when a softmax teacher exists only as the same layer's own scores; our reading for training from
  scratch).
- :func:`distill_layer`: the conversion recipe: the projections frozen, fit only the maps with Adam on samples ``x``
  (:func:`attnzoo.methods.linear.hedgehog.distill`), and write them into the layer.

Both use the layer's causality and its kernel's default ``scale = 1/√D``.
"""

from __future__ import annotations

import torch

from attnzoo.errors import fail
from attnzoo.methods.linear import hedgehog
from attnzoo.nn.attention import Attention


def _heads(layer: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(layer, Attention) or layer.method != "hedgehog":
        raise fail("layer", "an attnzoo.nn.Attention with method='hedgehog'", type(layer).__name__)
    missing = [name for name in hedgehog.NAMES if name not in layer.learnable]
    if missing:
        raise fail("layer", "a layer that owns its feature maps (none of q_weight… passed as fixed values)", missing)
    q, k, _ = layer.project(x)
    return q.detach(), k.detach()


def distillation_loss(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """The attention distillation loss of ``layer``'s feature maps on its own heads of ``x (B, N, dim)`` (scalar;
    gradients reach only the maps)."""
    q, k = _heads(layer, x)
    maps = {name: layer.learnable[name] for name in hedgehog.NAMES}
    scale = 1.0 / q.shape[-1] ** 0.5
    return hedgehog.softmax_kl(q, k, causal=layer.causal, scale=scale, **maps)


def distill_layer(layer: Attention, x: torch.Tensor, steps: int = 300, lr: float = 1e-2) -> list[float]:
    """Fit ``layer``'s feature maps to softmax attention on its heads of ``x (B, N, dim)`` (projections untouched),
    starting from its current maps; write the fitted maps into the layer and return the KL before each step and
    after the last (:func:`attnzoo.methods.linear.hedgehog.distill`)."""
    q, k = _heads(layer, x)
    current = {name: layer.learnable[name].detach() for name in hedgehog.NAMES}
    fitted, history = hedgehog.distill(q, k, causal=layer.causal, steps=steps, lr=lr, init=current)
    with torch.no_grad():
        for name, value in fitted.items():
            layer.learnable[name].copy_(value)
    return history
