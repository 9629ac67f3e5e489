"""L9 — L²ViT: enhanced linear global attention with a local concentration module (LCM).

Paper: "The Linear Attention Resurrection in Vision Transformer" (Zheng, arXiv:2501.16182); the formula follows the
author's public code (ChuanyangZheng/L2ViT, ``LinearAttention`` and ``LCM`` in ``classification/models/l2vit.py``).

Formula as implemented (noncausal; self or cross lengths; per head ``h``)::

    a_ij = relu(q_i) · relu(k_j)
    g_i  = τ_h · Σ_j a_ij v_j / max(Σ_j a_ij, m)                    linear global attention, m = min_denominator
    o    = g + LCM(g),   LCM(g) = DWConv₂(GELU(DWConv₁(g)))          local concentration

``τ_h`` is the per-head ``temperature`` (the code's learnable ``temperature``, initialised to ``D^−½``; None: the call's
``scale``, whose default is that same value). The clamp ``m = 100`` (the code's ``torch.clamp(denom, 1e2)``, which the
paper reports stabilises training) keeps the output small where few keys match; ``m = 0`` gives the plain normalised
form (a row whose normaliser is 0 gives 0). The LCM re-concentrates the spread-out linear attention on neighbours:
two depthwise convolutions (per head and value channel, "same" zero padding, kernel 7 in the paper) over the query
tokens laid out as ``layout`` — ``(h, w)`` with ``h·w = Sq`` for an image, or ``(Sq,)`` (the default) for a 1-D
sequence. Weights ``lcm_weight1/2 (H, Dv, *kernel)`` and biases ``lcm_bias1/2 (H, Dv)`` are learnable (owned by
``az.nn.Attention``, initialised as ``nn.Conv2d`` does); with no weights the LCM is skipped (plain enhanced linear
attention).

Choices: in the paper's block the LCM is its own residual branch on the LayerNorm-ed stream, with a BatchNorm between
GELU and the second convolution; here it acts on the attention output itself (``g + LCM(g)``) and the BatchNorm (a
training-statistics layer) is left to the surrounding model.

Reference: the dense ``(Sq × Skv)`` matrix ``a`` and the convolutions as explicit sums of shifted copies. Fast path
``torch`` (:func:`torch_factored`): ``relu(Q)(relu(K)ᵀ[V, 1])`` through :func:`attnzoo.kernels.linear_scan.noncausal`
(numerator and normaliser from one key/value summary per key head, O(N·D·Dv)) and ``torch.nn.functional.conv1d/conv2d``
with ``groups = H·Dv``. Time and memory O(N·D·(Dv + k^dims)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kernels import linear_scan
from attnzoo.methods.common import repeat_kv
from attnzoo.registry import NONCAUSAL_PATTERNS, Backend, Call, LayerInfo, MethodSpec, Param, TestHints, register

KERNEL = 7


def _layout_check(value: Any, call: Call) -> str | None:
    ok = len(value) in (1, 2) and all(isinstance(n, int) and n >= 1 for n in value)
    if not ok or math.prod(value) != call.seq_q:
        return f"(seq,) or (h, w) positive ints whose product is seq_q = {call.seq_q}"
    return None


def _dims(call_params: Any) -> int:
    layout = call_params.get("layout")
    return 1 if layout is None else len(layout)


def _weight_check(value: Any, call: Call) -> str | None:
    dims = _dims(call.params)
    ok = value.dim() == 2 + dims and tuple(value.shape[:2]) == (call.heads, call.head_dim_v)
    if not ok or any(n % 2 == 0 for n in value.shape[2:]):
        return f"a tensor of shape ({call.heads}, {call.head_dim_v}, {', '.join(['odd kernel'] * dims)})"
    return None


def _bias_check(value: Any, call: Call) -> str | None:
    return None if tuple(value.shape) == (call.heads, call.head_dim_v) else f"shape ({call.heads}, {call.head_dim_v})"


def _temperature_check(value: Any, call: Call) -> str | None:
    return None if tuple(value.shape) == (call.heads,) else f"a tensor of shape ({call.heads},)"


def _weight_init(info: LayerInfo) -> torch.Tensor:
    shape = (info.heads, info.head_dim, *([KERNEL] * _dims(info.params)))
    bound = 1.0 / math.sqrt(KERNEL ** _dims(info.params))  # nn.Conv2d's default: U(±1/√fan_in), depthwise
    return torch.empty(shape).uniform_(-bound, bound)


def _bias_init(info: LayerInfo) -> torch.Tensor:
    bound = 1.0 / math.sqrt(KERNEL ** _dims(info.params))
    return torch.empty(info.heads, info.head_dim).uniform_(-bound, bound)


def _sample(call: Call, gen: torch.Generator) -> dict[str, Any]:
    h, dv = call.heads, call.head_dim_v
    kernel = (3,) if call.seq_q < 8 else (5,)
    out = {
        "lcm_weight1": 0.3 * torch.randn(h, dv, *kernel, generator=gen), "lcm_bias1": torch.randn(h, dv, generator=gen),
        "lcm_weight2": 0.3 * torch.randn(h, dv, *kernel, generator=gen), "lcm_bias2": torch.randn(h, dv, generator=gen),
        "temperature": 0.5 + torch.rand(h, generator=gen), "min_denominator": 1.0,
    }
    return {n: t.to(call.device, call.dtype) if isinstance(t, torch.Tensor) else t for n, t in out.items()}


SPEC = MethodSpec(
    name="l2vit",
    family="linear",
    mechanism="L9",
    paper="The Linear Attention Resurrection in Vision Transformer",
    arxiv="2501.16182",
    summary="τ·relu(Q)(relu(K)ᵀV)/max(relu(Q)Σrelu(K), m), plus a depthwise-conv local concentration module",
    exact=True,
    patterns=NONCAUSAL_PATTERNS,
    params=(
        Param("layout", (tuple,), None, "(seq,) or (h, w) layout of the query tokens for the LCM; None: (seq_q,)",
              check=_layout_check),
        Param("temperature", (torch.Tensor,), None, "(H,) per-head output temperature τ (learnable); None: scale",
              check=_temperature_check, init=lambda i: torch.full((i.heads,), i.head_dim**-0.5)),
        Param("min_denominator", (float,), 100.0, "clamp m of the normaliser (the paper's 1e2; 0: plain)", low=0.0),
        Param("lcm_weight1", (torch.Tensor,), None, "(H, Dv, *kernel) first depthwise conv; None: no LCM",
              check=_weight_check, init=_weight_init),
        Param("lcm_bias1", (torch.Tensor,), None, "(H, Dv) first conv bias", check=_bias_check, init=_bias_init),
        Param("lcm_weight2", (torch.Tensor,), None, "(H, Dv, *kernel) second depthwise conv",
              check=_weight_check, init=_weight_init),
        Param("lcm_bias2", (torch.Tensor,), None, "(H, Dv) second conv bias", check=_bias_check, init=_bias_init),
    ),
    complexity="O(N·D·Dv + N·Dv·k^dims) time, O(N·(D+Dv)) memory",
    supports_mask=False,
    supports_bias=False,
    subquadratic_memory=True,
    tests=TestHints(sample_params=_sample, atol=1e-4, rtol=1e-3),
)


def _tau(q: torch.Tensor, scale: float, temperature: torch.Tensor | None) -> torch.Tensor | float:
    return scale if temperature is None else temperature.to(q.dtype)[None, :, None, None]


def _divide(num: torch.Tensor, den: torch.Tensor, floor: float) -> torch.Tensor:
    """``num / max(den, floor)``; where that is 0 (floor 0, no matching key) the row is 0."""
    den = den.clamp_min(floor)
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def _check_lcm(p: dict[str, Any]) -> bool:
    names = ("lcm_weight1", "lcm_bias1", "lcm_weight2", "lcm_bias2")
    given = [p.get(n) is not None for n in names]
    if any(given) and not (given[0] and given[2]):
        raise fail("lcm_weight1", "lcm_weight1 and lcm_weight2 both given (or neither)", "only one")
    if given[0] and p["lcm_weight1"].shape != p["lcm_weight2"].shape:
        raise fail("lcm_weight2", f"the shape of lcm_weight1 {tuple(p['lcm_weight1'].shape)}",
                   tuple(p["lcm_weight2"].shape))
    return given[0]


def _shifted_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise "same" convolution of ``x (B, H, *layout, Dv)`` as a sum of zero-padded shifted copies."""
    dims = weight.dim() - 2
    kernel = weight.shape[2:]
    pads: list[int] = []
    for k in reversed(kernel):
        pads += [k // 2, k // 2]
    padded = F.pad(x, [0, 0, *pads])
    out = torch.zeros_like(x)
    for offset in torch.cartesian_prod(*(torch.arange(k) for k in kernel)).reshape(-1, dims).tolist():
        window = padded
        for axis, (o, n) in enumerate(zip(offset, x.shape[2 : 2 + dims], strict=True)):
            window = window.narrow(2 + axis, o, n)
        w = weight[(slice(None), slice(None), *offset)]  # (H, Dv)
        out = out + window * w.reshape(1, w.shape[0], *([1] * dims), w.shape[1])
    if bias is not None:
        out = out + bias.reshape(1, bias.shape[0], *([1] * dims), bias.shape[1])
    return out


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    lcm = _check_lcm(params)
    h = q.shape[1]
    a = torch.relu(q) @ repeat_kv(torch.relu(k), h).transpose(-1, -2)  # (B, H, Sq, Skv)
    g = _tau(q, scale, params["temperature"]) * _divide(
        a @ repeat_kv(v, h).to(a.dtype), a.sum(-1, keepdim=True), params["min_denominator"]
    )
    if not lcm:
        return g.to(v.dtype)
    b, _, sq, dv = g.shape
    layout = params["layout"] or (sq,)
    grid = g.reshape(b, h, *layout, dv)
    hidden = F.gelu(_shifted_conv(grid, params["lcm_weight1"], params["lcm_bias1"]))
    local = _shifted_conv(hidden, params["lcm_weight2"], params["lcm_bias2"])
    return (g + local.reshape(b, h, sq, dv)).to(v.dtype)


def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (B, C, *layout)`` through a depthwise conv with ``weight (H, Dv, *kernel)`` (C = H·Dv), same padding."""
    kernel = weight.shape[2:]
    conv = F.conv1d if len(kernel) == 1 else F.conv2d
    w = weight.reshape(-1, 1, *kernel).to(x.dtype)
    return conv(x, w, None if bias is None else bias.reshape(-1).to(x.dtype), padding=[n // 2 for n in kernel],
                groups=w.shape[0])


def torch_factored(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, **params: Any,
) -> torch.Tensor:
    lcm = _check_lcm(params)
    acc = linear_scan.accumulation_dtype(q.dtype)
    qf, kf = torch.relu(q.to(acc)), torch.relu(k.to(acc))
    ones = v.new_ones(*v.shape[:-1], 1, dtype=acc)
    summed = linear_scan.noncausal(qf, kf, torch.cat([v.to(acc), ones], dim=-1), normalize=False)
    num, den = summed[..., :-1], summed[..., -1:]
    g = _tau(summed, scale, params["temperature"]) * _divide(num, den, params["min_denominator"])
    if not lcm:
        return g.to(v.dtype)
    b, h, sq, dv = g.shape
    layout = params["layout"] or (sq,)
    channels = g.permute(0, 1, 3, 2).reshape(b, h * dv, *layout)
    hidden = F.gelu(_depthwise(channels, params["lcm_weight1"], params["lcm_bias1"]))
    local = _depthwise(hidden, params["lcm_weight2"], params["lcm_bias2"])
    return (g + local.reshape(b, h, dv, sq).transpose(-1, -2)).to(v.dtype)


register(SPEC, reference, [Backend("torch", torch_factored)])
