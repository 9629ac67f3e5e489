"""``attnzoo.nn.SeerAttention``: the layer that owns SeerAttention's gate and distils it (arXiv:2410.13276).

An :class:`~attnzoo.nn.attention.Attention` with ``method="seer"``: its ``q_gate``/``k_gate`` are ``nn.Parameter``s
created from the spec's ``init`` (the identity gates, i.e. the training-free gate), and :meth:`SeerAttention.gate_loss`
is the paper's post-training objective on the layer's own queries and keys: the KL divergence from the block-level
max-pooled attention map of full attention to the gate's block distribution, with the projections frozen (the queries
and keys are detached, so only the gate learns). See :mod:`attnzoo.methods.sparse.seer`.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.methods.sparse import seer
from attnzoo.nn.attention import Attention


class SeerAttention(Attention):
    """Multi-head SeerAttention ``x (B, N, dim) -> (B, N, dim)``, causal by default (the LLM setting); ``**kwargs``
    are :class:`Attention`'s and the method's (``block_size``, ``top_k``, ``threshold``, ...). Train the gate with
    :meth:`gate_loss`; the forward attends sparsely."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, causal: bool = True, **kwargs: Any) -> None:
        super().__init__(dim, heads, kv_heads=kv_heads, method="seer", causal=causal, **kwargs)

    def _param(self, name: str) -> Any:
        if name in self.learnable:
            return self.learnable[name]
        return self.fixed.get(name, seer.SPEC.param(name).default)

    def gate_loss(self, x: torch.Tensor, context: torch.Tensor | None = None, pool: str = "max") -> torch.Tensor:
        """The gate's distillation loss on ``x`` (and ``context``): :func:`attnzoo.methods.sparse.seer.gate_loss` on
        the layer's detached queries and keys; gradients reach only ``q_gate``/``k_gate``."""
        q, k, _ = self.project(x, context)
        return seer.gate_loss(
            q.detach(), k.detach(), block_size=self._param("block_size"), causal=self.causal,
            query_block=self._param("query_block"), q_gate=self._param("q_gate"), k_gate=self._param("k_gate"),
            pool=pool,
        )
