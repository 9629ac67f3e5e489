"""``attnzoo.nn.CompressedConvAttention``: the CCA / CCGQA layer (H4).

Paper: "Compressed Convolutional Attention: Efficient Attention in a Compressed Latent Space" (Figliolia et al.;
arXiv:2510.04476). The layer down-projects ``x (B, N, dim)`` to latent queries, keys and values, transforms them as
CCA does (convolutions on q/k, q-k mean, L2 normalisation with a key temperature, value shift:
:func:`attnzoo.methods.heads.cca.latents`), runs attention *in the latent* with any self-attention method through
:func:`attnzoo.attention` (``method="softmax"`` by default), and projects the latent output back up to ``dim``.

Geometry, as in the released layer (Zyphra's ZAYA): the head dim stays that of the MHA layer it replaces
(``head_dim = dim / heads``); compression removes heads. ``compression = C`` gives ``heads / C`` latent query heads,
so the latent is ``dim / C`` wide and attention costs ``1/C`` of MHA's FLOPs; ``kv_compression`` (default ``C``:
CCA) gives ``heads / kv_compression`` latent key/value heads, fewer than the query heads for CCGQA, so the KV cache
is ``1/kv_compression`` of MHA's. ``kernel_sizes`` are the taps of the two convolutions (2, 2 in the released
model). :meth:`cost` and :meth:`mha_cost` give KV bytes and FLOPs (:func:`attnzoo.methods.heads.cca.cost`).

With ``method="softmax"`` the layer computes exactly ``attention(q̃, k̃, ṽ, method="cca", ...)`` on its latents (its
functional core, covered by the conformance suite); any other method (``"sigmoid"``, ``"selective"``...) attends
with CCA's transformed latents instead, its own learnable parts owned by the layer as in :class:`attnzoo.nn.Attention`.
``rope_base`` (default None: no positions) rotates the normalised latent queries and keys by RoPE
(:func:`attnzoo.kernels.rotary.rotary`, positions ``0 … N−1``), where the paper applies it: after the q-k mean and the
L2 normalisation, before attention. With it, ``method="softmax"`` computes ``attention(rope(q̃), rope(k̃), ṽ)``, no
longer the ``cca`` core on the raw projections (which takes positions only as ``bias``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.errors import fail
from attnzoo.kernels.rotary import rotary
from attnzoo.methods.heads.cca import KERNEL_SIZES, Cost, cost, initial_parameters, latents
from attnzoo.nn.attention import Attention
from attnzoo.registry import get


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(name, "a positive int", repr(value))
    return value


class CompressedConvAttention(Attention):
    """CCA (``kv_compression == compression``) or CCGQA (``kv_compression`` a larger multiple): ``x (B, N, dim) ->
    (B, N, dim)``, self-attention only. ``**params`` are the inner ``method``'s parameters."""

    def __init__(
        self, dim: int, heads: int, compression: int = 4, kv_compression: int | None = None,
        head_dim: int | None = None, method: str = "softmax", causal: bool = True,
        kernel_sizes: tuple[int, int] = KERNEL_SIZES, value_shift: bool = True, qkv_bias: bool = False,
        backend: str = "auto", faithful: bool = True, rope_base: float | None = None, **params: Any,
    ) -> None:
        _positive("dim", dim)
        _positive("heads", heads)
        compression = _positive("compression", compression)
        if heads % compression:
            raise fail("compression", f"a divisor of heads={heads} (latent heads = heads / compression)", compression)
        kv_compression = compression if kv_compression is None else _positive("kv_compression", kv_compression)
        latent_heads = heads // compression
        if heads % kv_compression or latent_heads % (heads // kv_compression):
            raise fail("kv_compression", f"a divisor of heads={heads} that is a multiple of compression={compression}",
                       kv_compression)
        if (not isinstance(kernel_sizes, tuple) or len(kernel_sizes) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in kernel_sizes)):
            raise fail("kernel_sizes", "a tuple of two positive ints (taps of the two convolutions)",
                       repr(kernel_sizes))
        if not isinstance(value_shift, bool):
            raise fail("value_shift", "a bool", repr(value_shift))
        if method == "cca":
            raise fail("method", "the method run inside the latent (the layer applies CCA's transforms itself)",
                       "'cca'")
        if "self/causal" not in get(method).spec.patterns and "self/noncausal" not in get(method).spec.patterns:
            raise fail("method", "a method with a self-attention pattern", repr(method))
        if head_dim is None:
            if dim % heads:
                raise fail("head_dim", f"an int, since dim={dim} is not divisible by heads={heads}", None)
            head_dim = dim // heads
        super().__init__(dim, latent_heads, kv_heads=heads // kv_compression, head_dim=head_dim, method=method,
                         causal=causal, qkv_bias=qkv_bias, backend=backend, faithful=faithful, **params)
        self.dim, self.mha_heads, self.kernel_sizes, self.value_shift = dim, heads, kernel_sizes, value_shift
        self.compression, self.kv_compression = compression, kv_compression
        if rope_base is not None and (isinstance(rope_base, bool) or not isinstance(rope_base, (int, float))
                                      or not rope_base > 1):
            raise fail("rope_base", "a RoPE base > 1 (e.g. 10000.0) or None", repr(rope_base))
        if rope_base is not None and head_dim % 2:
            raise fail("head_dim", f"an even head dim for RoPE (rope_base={rope_base})", head_dim)
        self.rope_base = rope_base
        for name, t in initial_parameters(latent_heads, self.kv_heads, head_dim, kernel_sizes).items():
            self.register_parameter(name, nn.Parameter(t))

    def project(
        self, x: torch.Tensor, context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latent queries, keys and values CCA attends with (:func:`attnzoo.methods.heads.cca.latents` of the
        down-projections of ``x``)."""
        if context is not None:
            raise fail("context", "None (CCA pairs each query with the key of the same token: self-attention only)",
                       "a tensor")
        q, k, v = latents(*super().project(x), conv_weight=self.conv_weight, conv_bias=self.conv_bias,
                          mix_weight=self.mix_weight, mix_bias=self.mix_bias, temperature=self.temperature,
                          value_shift=self.value_shift)
        if self.rope_base is None:
            return q, k, v
        positions = torch.arange(q.shape[2], device=q.device)
        return rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base), v

    def cost(self, n: int, element_bytes: int = 4) -> Cost:
        """KV bytes and FLOPs of this layer on ``n`` tokens."""
        return cost(n, self.dim, self.heads, self.kv_heads, self.head_dim, self.kernel_sizes, self.causal,
                    element_bytes)

    def mha_cost(self, n: int, element_bytes: int = 4) -> Cost:
        """KV bytes and FLOPs of the MHA layer it compresses (``heads`` heads of ``head_dim``) on ``n`` tokens."""
        return cost(n, self.dim, self.mha_heads, self.mha_heads, self.head_dim, None, self.causal, element_bytes)

    def extra_repr(self) -> str:
        return (f"compression={self.compression}, kv_compression={self.kv_compression}, {super().extra_repr()}, "
                f"kernel_sizes={self.kernel_sizes}, value_shift={self.value_shift}, rope_base={self.rope_base}")
