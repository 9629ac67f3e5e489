"""Hedgehog feature maps added to a loaded Hugging Face transformers model and fitted by attention distillation.

Paper: "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry" (Zhang et al.,
arXiv:2402.04347). Hedgehog turns a pretrained softmax Transformer into a linear-attention one by giving every
attention layer trainable feature maps ``φ_q, φ_k`` (:mod:`attnzoo.methods.linear.hedgehog`: ``z = (√scale·x) W + b``,
``φ = [exp(z), exp(−z)]``, one map per head, ``W = I, b = 0`` at first) and training only those maps, the model
frozen, so that each layer's linear attention weights match its softmax attention weights: per layer, the soft-label
cross-entropy between the two attention maps (here its KL form, :func:`attnzoo.methods.linear.hedgehog.softmax_kl`,
which differs by the softmax's entropy, a constant).

>>> import attnzoo.integrations.distill as azd
>>> history = azd.distill_hedgehog(model, batches, steps=150, lr=1e-2)   # then the model attends by hedgehog
>>> model(**inputs)

- :func:`add_hedgehog` adds the four map tensors to each chosen attention module as an ``nn.ParameterDict`` named
  ``attnzoo_hedgehog`` (so ``model.parameters()``, ``state_dict()`` and optimisers see them) and configures the model
  (:func:`attnzoo.integrations.transformers.configure`) to attend by ``hedgehog`` with each module's own tensors;
  trained any other way (fine-tuning with a task loss, say), they are used as they are.
- :func:`distill_hedgehog` does that, then runs the model once over ``batches`` with its original softmax attention,
  recording every chosen layer's queries, keys and mask (the paper's teacher forcing: each layer sees the softmax
  model's inputs, so its loss depends on its own maps only and one pass of the model suffices), and fits all layers'
  maps at once with Adam on the sum of their losses, one captured batch per step in turn. Padding is handled: the
  keys a query sees are the model's mask's, and only the real tokens' rows (``attention_mask`` of the batch) count.

The recording pass uses one more attention implementation, ``attnzoo_distill_capture`` (registered like the others,
with transformers' ``sdpa_mask``), set on the model for that pass only: softmax attention through attnzoo that keeps
its inputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

import attnzoo
from attnzoo.errors import fail
from attnzoo.integrations.transformers import (
    LayerSetting,
    attention_modules,
    configure,
    require_transformers,
)
from attnzoo.methods.linear import hedgehog

CAPTURE = "attnzoo_distill_capture"
MAPS = "attnzoo_hedgehog"


@dataclass(frozen=True)
class Sample:
    """One layer's attention inputs on one batch: ``q (B, H, Sq, D)``, ``k (B, Hkv, Skv, D)``, the model's boolean
    ``mask`` (None: all visible), ``rows (B, Sq)`` (the real tokens; None: all), ``causal`` and ``scale``."""

    q: torch.Tensor
    k: torch.Tensor
    mask: torch.Tensor | None
    rows: torch.Tensor | None
    causal: bool
    scale: float

    def loss(self, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Hedgehog's distillation loss of ``maps`` on this sample."""
        return hedgehog.softmax_kl(self.q, self.k, causal=self.causal, scale=self.scale, mask=self.mask,
                                   rows=self.rows, **maps)


def head_shape(module: torch.nn.Module) -> tuple[int, int, int]:
    """``(heads, kv_heads, head_dim)`` of an attention module, from its ``config`` (``num_attention_heads``,
    ``num_key_value_heads`` if any, ``head_dim`` if any, else ``hidden_size // num_attention_heads``)."""
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise fail("model", "attention modules whose config has num_attention_heads", type(module).__name__)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def chosen_modules(model: torch.nn.Module, layers: Iterable[int] | None) -> list[torch.nn.Module]:
    """The attention modules of ``model`` in ``layers`` (their ``layer_idx``; None: all)."""
    wanted = None if layers is None else set(layers)
    return [x for x in attention_modules(model) if wanted is None or x.layer_idx in wanted]


def add_hedgehog(model: torch.nn.Module, layers: Iterable[int] | None = None) -> torch.nn.Module:
    """Give each attention module in ``layers`` (None: all) trainable Hedgehog maps (an ``nn.ParameterDict``
    ``attnzoo_hedgehog``: ``q_weight (H, D, D)``, ``q_bias (H, D)``, ``k_weight (Hkv, D, D)``, ``k_bias (Hkv, D)``,
    the paper's identity initialisation; a module that has them keeps its own) and make the model attend by
    ``hedgehog`` with them there (the other layers by softmax). Returns ``model``."""
    layers = None if layers is None else list(layers)
    configure(model, "hedgehog", layers=layers)  # checks the layers and the pattern of each before anything changes
    for x in chosen_modules(model, layers):
        if not isinstance(getattr(x, MAPS, None), torch.nn.ParameterDict):
            device = next(x.parameters()).device
            maps = hedgehog.identity_maps(*head_shape(x))
            setattr(x, MAPS, torch.nn.ParameterDict({n: torch.nn.Parameter(t.to(device)) for n, t in maps.items()}))
        x.attnzoo_settings = {**x.attnzoo_settings, "hedgehog": LayerSetting("hedgehog", dict(getattr(x, MAPS)))}
    return model


def capture_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    is_causal: bool | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The recording pass's attention function: softmax attention (what ``sdpa`` computes) whose inputs are appended
    to the module's ``attnzoo_capture`` list, when it has one."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    store = getattr(module, "attnzoo_capture", None)
    if store is not None:
        store.append(Sample(query.detach(), key.detach(), attention_mask, None, causal, scale))
    out = attnzoo.attention(query, key, value, method="softmax", causal=causal, mask=attention_mask, scale=scale)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def recording(model: torch.nn.Module, modules: list[torch.nn.Module]):
    """Within the block, ``model`` attends by softmax through :func:`capture_attention` and each of ``modules``
    keeps its inputs (``module.attnzoo_capture``); the model's implementation comes back after it."""
    transformers = require_transformers()
    masking = importlib.import_module("transformers.masking_utils")
    transformers.AttentionInterface.register(CAPTURE, capture_attention)
    masking.AttentionMaskInterface.register(CAPTURE, masking.sdpa_mask)
    before = model.config._attn_implementation
    try:
        for x in modules:
            x.attnzoo_capture = []
        model.set_attn_implementation(CAPTURE)
        yield
    finally:
        model.set_attn_implementation(before)
        for x in modules:
            x.attnzoo_capture = None


def record(
    model: torch.nn.Module, modules: list[torch.nn.Module], batches: Iterable[Mapping[str, torch.Tensor]],
) -> list[list[Sample]]:
    """Per batch, each module's :class:`Sample` (in ``modules`` order) from one gradient-free pass of ``model`` with
    softmax attention; a batch's ``attention_mask`` gives the real rows of each self-attention sample."""
    out = []
    with recording(model, modules), torch.no_grad():
        for batch in batches:
            model(**batch)
            rows = batch.get("attention_mask")
            samples = []
            for x in modules:
                if len(x.attnzoo_capture) != 1:
                    raise fail("model", "one attention call per layer and batch (no generate, no cache reuse)",
                               f"{len(x.attnzoo_capture)} calls of layer {x.layer_idx}")
                s = x.attnzoo_capture.pop()
                real = rows if rows is not None and rows.shape == (s.q.shape[0], s.q.shape[2]) else None
                samples.append(Sample(s.q, s.k, s.mask, None if real is None else real.bool(), s.causal, s.scale))
            out.append(samples)
    if not out:
        raise fail("batches", "at least one batch of model inputs", "none")
    return out


def distill_hedgehog(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], steps: int = 150, lr: float = 1e-2,
    layers: Iterable[int] | None = None,
) -> list[float]:
    """Add Hedgehog maps to ``model``'s attention layers (:func:`add_hedgehog`) and fit them by attention
    distillation from the model's own softmax attention on ``batches`` (dicts of model inputs, e.g. a tokenizer's
    output with ``attention_mask``), with Adam (``lr``) for ``steps`` steps; the model then attends by them.

    Each step takes the next batch in turn (they are recorded once, see the module docstring) and minimises the sum
    over layers of :func:`~attnzoo.methods.linear.hedgehog.softmax_kl`. Returns the mean KL per layer before each
    step and after the last (``steps + 1`` figures, each on that step's batch). The model's own weights are not
    changed. The model must be in eval mode (no attention dropout while recording).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise fail("steps", "a non-negative int", repr(steps))
    if not lr > 0:
        raise fail("lr", "a positive learning rate", repr(lr))
    layers = None if layers is None else list(layers)
    add_hedgehog(model, layers)
    modules = chosen_modules(model, layers)
    samples = record(model, modules, batches)
    maps = [getattr(x, MAPS) for x in modules]
    for s, m, x in zip(samples[0], maps, modules):
        heads, kv_heads, head_dim = s.q.shape[1], s.k.shape[1], s.q.shape[3]
        if m["q_weight"].shape[:2] != (heads, head_dim) or m["k_weight"].shape[0] != kv_heads:
            raise fail("model", f"the head shapes its config gives (layer {x.layer_idx}: query maps "
                       f"{tuple(m['q_weight'].shape)})", f"queries {tuple(s.q.shape)}, keys {tuple(s.k.shape)}")
    opt = torch.optim.Adam([p for m in maps for p in m.values()], lr=lr)
    history = []
    with torch.enable_grad():
        for i in range(steps + 1):
            losses = [s.loss(dict(m)) for s, m in zip(samples[i % len(samples)], maps)]
            total = torch.stack(losses).sum()
            history.append(float(total.detach()) / len(losses))
            if i == steps:
                break
            opt.zero_grad()
            total.backward()
            opt.step()
    return history
