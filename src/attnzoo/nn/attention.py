"""``attnzoo.nn.Attention``: multi-head attention with any registered method.

The layer owns the q/k/v/output projections and, for methods with learnable parts (parameters whose spec has an
``init``), an ``nn.Parameter`` per part, passed to :func:`attnzoo.attention` on every call. For a method whose paper
defines a layer around its kernel (gates, short convolutions, output norms: :data:`attnzoo.nn.layers.LAYERS`), it
also builds those parts (``faithful=True``, the default), so the method trains as its paper's layer does. Fixed
parameters given at construction are validated there, so a wrong name or value fails when the model is built, not at
the first batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.api import attention
from attnzoo.errors import AttnzooError, fail
from attnzoo.nn.layers import LAYERS, LayerParts
from attnzoo.registry import LayerInfo, get


class Attention(nn.Module):
    """Multi-head attention ``x (B, N, dim) -> (B, N, dim)`` computed by ``method``.

    ``kv_heads`` < ``heads`` gives GQA/MQA; ``context_dim`` enables cross-attention on ``forward(x, context)``.
    ``**params`` are the method's parameters; learnable ones not given are created from their ``init``.
    ``faithful``: build the paper's layer parts around the kernel where attnzoo has them (``self.parts``, see
    :mod:`attnzoo.nn.layers`); False gives the bare kernel between the projections.
    """

    def __init__(
        self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None, method: str = "softmax",
        causal: bool = False, context_dim: int | None = None, qkv_bias: bool = False, backend: str = "auto",
        faithful: bool = True, **params: Any,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(name, "a positive int", repr(value))
        kv_heads = heads if kv_heads is None else kv_heads
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise fail("kv_heads", f"a positive int dividing heads={heads}", repr(kv_heads))
        if head_dim is None:
            if dim % heads:
                raise fail("head_dim", f"an int, since dim={dim} is not divisible by heads={heads}", None)
            head_dim = dim // heads
        spec = get(method).spec
        known = {p.name: p for p in spec.params}
        for name in params:
            if name not in known:
                raise AttnzooError(f"{name}: unknown parameter for method {method!r} (it takes {list(known)})")
        self.method, self.causal, self.backend = method, causal, backend
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        kv_in = dim if context_dim is None else context_dim
        self.k_proj = nn.Linear(kv_in, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_in, kv_heads * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(heads * head_dim, dim)
        if not isinstance(faithful, bool):
            raise fail("faithful", "a bool", repr(faithful))
        factory = LAYERS.get(method) if faithful else None
        computed = getattr(factory, "computes", ())
        for name in params:
            if name in computed:
                raise fail(name, f"no value: {method!r}'s paper layer computes it from the input (faithful=False "
                           "to pass it yourself)", "a value")
        fixed = {n: known[n].validate(v) for n, v in params.items()}
        info = LayerInfo(heads=heads, kv_heads=kv_heads, head_dim=head_dim, params=fixed, dim=dim)
        self.parts: LayerParts | None = None if factory is None else factory(info)
        self.learnable = nn.ParameterDict()
        for p in spec.params:
            if p.init is not None and p.name not in fixed:
                self.learnable[p.name] = nn.Parameter(p.init(info))
        self.fixed = fixed

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project(x, context)
        computed: dict[str, Any] = {}
        if self.parts is not None:
            q, k, v, computed = self.parts(x, q, k, v)
        out = attention(
            q, k, v, method=self.method, causal=self.causal, mask=mask, backend=self.backend,
            **self.fixed, **dict(self.learnable.items()), **computed,
        )
        return self.merge_heads(out, x)

    def merge_heads(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's output ``(B, N, dim)`` from the heads' attention ``out (B, H, N, head_dim)`` of the input ``x``:
        the paper layer's output parts (if any) around the output projection."""
        b, _, n, _ = out.shape
        if self.parts is not None:
            out = self.parts.finish(x, out)
        y = self.out_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))
        return y if self.parts is None else self.parts.output(y)

    def project(
        self, x: torch.Tensor, context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heads ``q (B, H, N, head_dim)``, ``k, v (B, Hkv, N', head_dim)`` of ``x`` (and ``context``)."""
        if x.dim() != 3:
            raise fail("x", "a (batch, seq, dim) tensor", f"shape {tuple(x.shape)}")
        src = x if context is None else context
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(src).view(b, src.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(src).view(b, src.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, heads={self.heads}, kv_heads={self.kv_heads}, causal={self.causal}, "
                f"faithful={self.parts is not None}")
