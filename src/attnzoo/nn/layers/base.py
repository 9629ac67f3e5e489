"""What a paper's layer adds around its attention kernel, and the registry ``az.nn.Attention`` builds it from.

Many papers define more than a kernel: Gated DeltaNet computes its decay and writing strength from the token, runs
short convolutions on q/k/v and gates its output; sigmoid attention fixes its bias from the length. The kernels take
these as explicit inputs (``log_gate``, ``beta``...); a :class:`LayerParts` subclass is the paper's layer that
produces them. ``attnzoo.nn.Attention(dim, heads, method=name)`` builds the parts registered for ``name`` (unless
``faithful=False``), so ``method="gated_delta"`` is Gated DeltaNet, not an ungated DeltaNet with ``β = 1``.

Shared blocks: :class:`ShortConvolution` (causal depthwise convolution + SiLU) and :class:`GatedRMSNorm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.errors import fail
from attnzoo.registry import LayerInfo


class LayerParts(nn.Module):
    """The parts around one method's kernel in its paper's layer.

    ``computes``: the method parameters these parts produce per call (a user may not pass them too).
    :meth:`forward` transforms the projected heads and returns those parameters; :meth:`finish` transforms the
    heads' attention output before the output projection; :meth:`output` transforms the layer's output after it
    (a norm of the whole sublayer output, as sigmoid attention's hybrid-norm). All default to the identity.
    """

    computes: tuple[str, ...] = ()

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """``x (B, N, dim)`` and its heads ``q (B, H, N, D)``, ``k``/``v (B, Hkv, N, ·)`` → new heads and parameters."""
        return q, k, v, {}

    def finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The heads' attention output ``out (B, H, N, Dv)`` as the layer passes it to its output projection."""
        return out

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """The output projection's result ``y (B, N, dim)`` as the layer returns it."""
        return y


LayerFactory = Callable[[LayerInfo], LayerParts]
LAYERS: dict[str, LayerFactory] = {}


def register_layer(method: str, factory: LayerFactory) -> None:
    """Make ``az.nn.Attention(..., method=method)`` build ``factory(info)`` around the kernel."""
    if method in LAYERS:
        raise fail("method", f"a method without layer parts yet ({method!r} has {LAYERS[method].__name__})", method)
    LAYERS[method] = factory


def heads_to_channels(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D)`` → ``(B, N, H·D)``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def channels_to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H·D)`` → ``(B, H, N, D)``."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution over the sequence, then SiLU: ``(B, N, C) → (B, N, C)``.

    Token ``t`` sees tokens ``t − size + 1 … t`` of its own channel (zero padding before the start), as in H3, Mamba
    and the DeltaNet family's layers (kernel size 4, no bias, PyTorch's default initialisation).
    """

    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv1d(channels, channels, size, groups=channels, padding=size - 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))


class GatedRMSNorm(nn.Module):
    """``RMSNorm(o) · w · SiLU(g)`` over the last dim (computed in fp32): the output gate and norm of Mamba2-style
    layers (Gated DeltaNet's ``o_norm``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        o32 = o.float()
        normed = o32 * torch.rsqrt(o32.square().mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float() * F.silu(gate.float())).to(o.dtype)


class ConvolvedGatedParts(LayerParts):
    """The frame Mamba2-style memory layers share (Gated DeltaNet, Titans): SiLU short convolutions on q, k and v
    (:meth:`convolve`) and the gated output norm ``o ← RMSNorm(o) · w · SiLU(W_g x)`` per head (:meth:`finish`).
    A subclass adds its gates and calls :meth:`convolve` in its ``forward``."""

    def __init__(self, info: LayerInfo, conv_size: int = 4, norm_eps: float = 1e-5) -> None:
        super().__init__()
        h, hkv, d = info.heads, info.kv_heads, info.head_dim
        self.heads, self.kv_heads = h, hkv
        self.q_conv = ShortConvolution(h * d, conv_size)
        self.k_conv = ShortConvolution(hkv * d, conv_size)
        self.v_conv = ShortConvolution(hkv * d, conv_size)
        self.gate_proj = nn.Linear(info.dim, h * d, bias=False)
        self.o_norm = GatedRMSNorm(d, norm_eps)

    def convolve(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``(B, H, N, D)`` through their short convolutions along the sequence."""
        return (channels_to_heads(self.q_conv(heads_to_channels(q)), self.heads),
                channels_to_heads(self.k_conv(heads_to_channels(k)), self.kv_heads),
                channels_to_heads(self.v_conv(heads_to_channels(v)), self.kv_heads))

    def finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.o_norm(out, channels_to_heads(self.gate_proj(x), self.heads))
