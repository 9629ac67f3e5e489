"""``attnzoo.nn.KeyDrivenGQA``: grouped-query attention whose query heads follow the key norms (arXiv:2408.08454).

An :class:`~attnzoo.nn.attention.Attention` with ``method="key_driven_gqa"`` (:mod:`attnzoo.methods.heads.
key_driven_gqa`) that decides, per forward pass, how many query heads each KV head serves:

- ``"kdgqa"``: from this batch's min-max scaled key norms;
- ``"dgqa"`` / ``"dgqa_diff"``: DGQA, from the key norms tracked by a moving average (buffer ``key_norms``, updated
  in training mode only, as batch-norm statistics): in proportion to the average, or to how far this batch's norms
  moved from it;
- ``"pgqa"``: uniform GQA groups, each head's output perturbed by noise in training mode (off in eval mode, where
  the public code keeps it: a choice, so that inference is deterministic);
- ``"gqa"``: uniform groups, plain GQA (the baseline the others are compared with).

The allocation the last forward used is :attr:`KeyDrivenGQA.last_allocation`. :meth:`KeyDrivenGQA.from_mha` converts
a multi-head ``az.nn.Attention`` to this grouped form by mean-pooling the K/V projections of each group of
``heads / kv_heads`` consecutive heads (GQA uptraining, Ainslie et al., arXiv:2305.13245, as the paper's ViT
experiments), copying the query and output projections.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.api import attention
from attnzoo.errors import fail
from attnzoo.methods.heads.key_driven_gqa import (
    EMA_BETA,
    dgqa_allocation,
    key_norm_allocation,
    key_norms,
    perturbed,
    uniform_allocation,
)
from attnzoo.nn.attention import Attention

VARIANTS = ("kdgqa", "dgqa", "dgqa_diff", "pgqa", "gqa")


def pool_kv_heads(t: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """A K or V projection's weight ``(heads·D, in)`` or bias ``(heads·D,)`` with each group of ``heads / kv_heads``
    consecutive heads mean-pooled into one: ``(kv_heads·D, ...)``."""
    d = t.shape[0] // heads
    return t.reshape(kv_heads, heads // kv_heads, d, *t.shape[1:]).mean(dim=1).reshape(kv_heads * d, *t.shape[1:])


class KeyDrivenGQA(Attention):
    """Key-driven GQA ``x (B, N, dim) -> (B, N, dim)`` (noncausal, as the paper's ViTs).

    ``variant``: one of :data:`VARIANTS`. ``ema_beta``: DGQA's weight of the current batch in the moving average.
    ``generator``: PGQA's noise source (torch's global one if None). ``**kwargs`` are :class:`Attention`'s.
    """

    def __init__(
        self, dim: int, heads: int, kv_heads: int, variant: str = "kdgqa", ema_beta: float = EMA_BETA,
        generator: torch.Generator | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(dim, heads, kv_heads=kv_heads, method="key_driven_gqa", **kwargs)
        if variant not in VARIANTS:
            raise fail("variant", f"one of {list(VARIANTS)}", repr(variant))
        if isinstance(ema_beta, bool) or not isinstance(ema_beta, (int, float)) or not 0 < ema_beta <= 1:
            raise fail("ema_beta", "a number in (0, 1]", repr(ema_beta))
        if self.causal:
            raise fail("causal", "False (the allocation reads every key: future keys would choose the groups of "
                       "earlier queries)", True)
        if "allocation" in self.fixed:
            raise fail("allocation", "no value: KeyDrivenGQA decides it per forward pass", "a value")
        self.variant, self.ema_beta, self.generator = variant, float(ema_beta), generator
        self.register_buffer("key_norms", torch.zeros(self.kv_heads))
        self.register_buffer("tracked", torch.zeros((), dtype=torch.bool))
        self.last_allocation: tuple[int, ...] | None = None

    def allocation(self, k: torch.Tensor) -> tuple[int, ...]:
        """Query heads per KV head for keys ``k (B, Hkv, N, D)``; DGQA updates its moving average in training."""
        if self.variant == "kdgqa":
            return key_norm_allocation(k, self.heads)
        if self.variant in ("pgqa", "gqa"):
            return uniform_allocation(self.heads, self.kv_heads)
        previous = self.key_norms.double() if bool(self.tracked) else None
        variant = "ema" if self.variant == "dgqa" else "diff"
        chosen, average = dgqa_allocation(key_norms(k), previous, self.heads, variant, self.ema_beta)
        if self.training:
            self.key_norms.copy_(average)
            self.tracked.fill_(True)
        return chosen

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project(x, context)
        self.last_allocation = self.allocation(k)
        out = attention(q, k, v, method=self.method, causal=self.causal, mask=mask, backend=self.backend,
                        allocation=self.last_allocation, **self.fixed, **dict(self.learnable.items()))
        if self.variant == "pgqa" and self.training:
            out = perturbed(out, self.heads // self.kv_heads, self.generator)
        return self.merge_heads(out, x)

    @classmethod
    def from_mha(cls, mha: Attention, kv_heads: int, variant: str = "kdgqa", **kwargs: Any) -> KeyDrivenGQA:
        """A :class:`KeyDrivenGQA` with ``kv_heads`` KV heads from the multi-head layer ``mha`` (same ``dim``, heads,
        head_dim, biases, causal flag): query and output projections copied, each group of ``heads / kv_heads``
        consecutive K/V heads mean-pooled."""
        if not isinstance(mha, Attention) or mha.kv_heads != mha.heads:
            raise fail("mha", "a multi-head az.nn.Attention (kv_heads == heads)", type(mha).__name__ if not
                       isinstance(mha, Attention) else f"kv_heads={mha.kv_heads}, heads={mha.heads}")
        if mha.k_proj.in_features != mha.q_proj.in_features:
            raise fail("mha", "a self-attention layer (no context_dim)", f"context_dim={mha.k_proj.in_features}")
        qkv_bias = mha.q_proj.bias is not None
        layer = cls(mha.q_proj.in_features, mha.heads, kv_heads, variant=variant, head_dim=mha.head_dim,
                    qkv_bias=qkv_bias, causal=mha.causal, **kwargs)
        with torch.no_grad():
            layer.q_proj.load_state_dict(mha.q_proj.state_dict())
            layer.out_proj.load_state_dict(mha.out_proj.state_dict())
            for pooled, full in ((layer.k_proj, mha.k_proj), (layer.v_proj, mha.v_proj)):
                pooled.weight.copy_(pool_kv_heads(full.weight, mha.heads, kv_heads))
                if qkv_bias:
                    pooled.bias.copy_(pool_kv_heads(full.bias, mha.heads, kv_heads))
        return layer
