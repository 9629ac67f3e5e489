"""H4 — compressed convolutional attention (CCA) and its grouped-query form (CCGQA).

Paper: "Compressed Convolutional Attention: Efficient Attention in a Compressed Latent Space" (Figliolia, Alonso,
Iyer, Anthony, Millidge; Zyphra; arXiv:2510.04476). The released layer (Zyphra's ZAYA models, in their vLLM and MLX
ports) fixed the details the paper leaves open; where we follow it we say so.

CCA down-projects the input ``x (N, E)`` to latents whose width is ``E / C`` (compression ``C``) and runs the *whole*
attention there: the latent queries, keys and values are never projected back up before attention, so attention
FLOPs and the KV cache both shrink by ``C``. The layer that owns the projections is
:class:`attnzoo.nn.CompressedConvAttention`; this method is its functional core: given the latents
``q̃ (B, H, N, d)``, ``k̃ (B, Hkv, N, d)``, ``ṽ (B, Hkv, N, dv)`` (CCGQA when ``Hkv < H``) it computes, per token ``t``:

    packed latents   z = [q̃ ; k̃]            (H + Hkv heads of d channels, query heads first)
    convolutions     c = conv2(conv1(z))      causal along the sequence (zeros before the first token):
                     conv1: depthwise, one filter of ``k1`` taps per channel (``conv_weight (H+Hkv, d, k1)``,
                            ``conv_bias (H+Hkv, d)``)                                     — the paper's conv_seq
                     conv2: grouped by head, mixing the d channels of a head over ``k2`` taps
                            (``mix_weight (H+Hkv, d, d, k2)``, ``mix_bias (H+Hkv, d)``)   — the paper's conv_seq+ch
    q-k mean         m_q[h] = (q̃[h] + k̃[g(h)]) / 2,    m_k[g] = mean over the query heads h of group g of m_q[h]
                     q = c_q + m_q,   k = c_k + m_k
    normalisation    q ← √d · q / ‖q‖,   k ← τ_g · √d · k / ‖k‖      (τ: ``temperature (Hkv,)``)
    value shift      the first ⌈n/2⌉ of the ``n = Hkv·dv`` value channels (head-major) are token t's, the last
                     ⌊n/2⌋ are token t−1's (zero at t = 0)
    attention        O = softmax(scale · q kᵀ + bias + mask) v     (scale 1/√d by default: logits τ·√d·cos(q, k))

Choices:

- The two convolutions run on the packed latent padded once with ``k1 + k2 − 2`` zeros before the first token and
  are then applied without padding, as the released layer does: with a bias, ``conv1``'s outputs over the padding
  are its bias, which ``conv2`` sees. ``conv_weight=None`` (``mix_weight=None``) makes that convolution the
  identity (its bias, if given, is still added). Kernel sizes are read from the weights; the released model uses
  2 and 2 (:data:`KERNEL_SIZES`).
- The convolutions are causal in every pattern (the paper's models are decoders); in a noncausal call a token's
  latents still mix only with earlier tokens', while attention sees every key.
- The q-k mean pairs a query head with its group's key head, so ``q`` and ``k`` index the same tokens: CCA is
  self-attention only (``seq_q == seq_kv``); cross-attention is refused.
- The value shift is a fixed split of the latent value channels (the released layer's two value projections, one
  of ``x_t`` and one of ``x_{t−1}``: shifting a projection is projecting the shifted input). ``value_shift=False``
  turns it off.
- ``temperature=None`` means τ = 1; the layer initialises it at 1 (the released layer loads trained values). The
  norm is taken as ``max(‖x‖, 1e-12)``.
- Rotary embeddings, which the paper applies to the normalised latents, are not part of this core (attnzoo's
  functional methods take positions as ``bias``); :class:`attnzoo.nn.CompressedConvAttention` applies them to its
  latents when given ``rope_base``.

Functions: :func:`reference` (explicit taps and a shift matrix, dense softmax), the fast path
:func:`sdpa_latent` (:func:`latents`: two ``conv1d`` calls on the packed latent, then
:func:`attnzoo.kernels.dense.sdpa_attention`), decoding (:data:`DECODER`: the transformed keys and shifted values
cached, with the last ``k1 + k2 − 2`` raw latents and the last raw value for the convolutions and the shift) and
:func:`cost`, the KV bytes and FLOPs of a CCA (or MHA) layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.errors import fail
from attnzoo.kernels.dense import attention_lse, sdpa_attention
from attnzoo.methods.common import Output, dense_scores, repeat_kv, softmax_rows, visible
from attnzoo.registry import SELF_PATTERNS, Backend, Call, Decoder, LayerInfo, MethodSpec, Param, TestHints, register

KERNEL_SIZES = (2, 2)  # the released model's conv1 and conv2 taps
NORM_EPS = 1e-12


# ---- parameters ---------------------------------------------------------------------------------------------------

def _packed(call: Call) -> int:
    return call.heads + call.kv_heads


def _tensor_check(shape_of: Any, what: str, taps: bool) -> Any:
    """A check that the value is a floating tensor of ``shape_of(call)`` (plus a last dim of ≥ 1 taps)."""
    def check(value: torch.Tensor, call: Call) -> str | None:
        want = tuple(shape_of(call))
        got = tuple(value.shape)
        ok = got[:-1] == want and got[-1] >= 1 if taps else got == want
        if not ok:
            return f"a tensor of shape {want + ('taps',) if taps else want} ({what})"
        if not value.is_floating_point():
            return "a floating-point tensor"
        return None

    return check


def initial_parameters(
    heads: int, kv_heads: int, head_dim: int, kernel_sizes: tuple[int, int] = KERNEL_SIZES,
) -> dict[str, torch.Tensor]:
    """Initial convolution weights and biases (``torch.nn.Conv1d``'s default: uniform in ``±1/√fan_in``, fan-in
    ``k1`` for the depthwise convolution and ``d·k2`` for the per-head one) and temperature 1."""
    c, d = heads + kv_heads, head_dim
    k1, k2 = kernel_sizes

    def uniform(fan_in: int, *shape: int) -> torch.Tensor:
        bound = 1 / math.sqrt(fan_in)
        return torch.empty(*shape).uniform_(-bound, bound)

    return {"conv_weight": uniform(k1, c, d, k1), "conv_bias": uniform(k1, c, d),
            "mix_weight": uniform(d * k2, c, d, d, k2), "mix_bias": uniform(d * k2, c, d),
            "temperature": torch.ones(kv_heads)}


def _init(name: str) -> Any:
    def init(layer: LayerInfo) -> torch.Tensor:
        return initial_parameters(layer.heads, layer.kv_heads, layer.head_dim)[name]

    return init


def _sample(call: Call, generator: torch.Generator) -> dict[str, Any]:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(call.dtype)

    c, d = _packed(call), call.head_dim
    return {
        "conv_weight": 0.5 * rand(c, d, 2), "conv_bias": 0.1 * rand(c, d),
        "mix_weight": rand(c, d, d, 3) / math.sqrt(3 * d), "mix_bias": 0.1 * rand(c, d),
        "temperature": 1.0 + 0.2 * rand(call.kv_heads),
    }


SPEC = MethodSpec(
    name="cca",
    family="heads",
    mechanism="H4",
    paper="Compressed Convolutional Attention: Efficient Attention in a Compressed Latent Space",
    arxiv="2510.04476",
    summary="attention inside a down-projected latent (CCA; CCGQA with fewer KV heads): causal depthwise + per-head "
    "convolutions on q/k, q-k mean, L2-normalised q/k with a key temperature, half the value channels from the "
    "previous token",
    exact=True,
    patterns=SELF_PATTERNS,
    params=(
        Param("conv_weight", (torch.Tensor,), None,
              "(heads + kv_heads, head_dim, taps): depthwise causal convolution of the packed [q; k] latent",
              check=_tensor_check(lambda c: (_packed(c), c.head_dim), "heads + kv_heads, head_dim", taps=True),
              init=_init("conv_weight")),
        Param("conv_bias", (torch.Tensor,), None, "(heads + kv_heads, head_dim): bias of the depthwise convolution",
              check=_tensor_check(lambda c: (_packed(c), c.head_dim), "heads + kv_heads, head_dim", taps=False),
              init=_init("conv_bias")),
        Param("mix_weight", (torch.Tensor,), None,
              "(heads + kv_heads, head_dim, head_dim, taps): causal convolution mixing each head's channels",
              check=_tensor_check(lambda c: (_packed(c), c.head_dim, c.head_dim),
                                  "heads + kv_heads, head_dim out, head_dim in", taps=True),
              init=_init("mix_weight")),
        Param("mix_bias", (torch.Tensor,), None, "(heads + kv_heads, head_dim): bias of the per-head convolution",
              check=_tensor_check(lambda c: (_packed(c), c.head_dim), "heads + kv_heads, head_dim", taps=False),
              init=_init("mix_bias")),
        Param("temperature", (torch.Tensor,), None, "τ (kv_heads,): key temperature after L2 normalisation",
              check=_tensor_check(lambda c: (c.kv_heads,), "kv_heads", taps=False),
              init=_init("temperature")),
        Param("value_shift", (bool,), True, "the last half of the value channels come from the previous token"),
    ),
    complexity="O(N²·H·d) attention in the latent (C× fewer heads than the MHA layer), O(N·(H+Hkv)·d²·k) convolutions",
    tests=TestHints(sample_params=_sample),
    lse=True,
)


# ---- the reference: explicit taps, a shift matrix, dense softmax ---------------------------------------------------

def _taps_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    per_head: bool) -> torch.Tensor:
    """One convolution without padding over ``x (B, Hh, P, d)``: output ``t`` is ``Σ_j W_j · x[t + j]`` over the
    ``taps`` of ``weight`` (per channel, or ``(d_out, d_in)`` per head), plus ``bias``; None is the identity."""
    if weight is None:
        y = x
    else:
        taps = weight.shape[-1]
        length = x.shape[2] - taps + 1
        y = torch.zeros(*x.shape[:2], length, x.shape[3], dtype=x.dtype, device=x.device)
        for j in range(taps):
            window = x[:, :, j : j + length]
            if per_head:
                y = y + torch.einsum("hoi,bhti->bhto", weight[..., j].to(x.dtype), window)
            else:
                y = y + window * weight[:, None, :, j].to(x.dtype)
    return y if bias is None else y + bias[:, None, :].to(x.dtype)


def _reach(conv_weight: torch.Tensor | None, mix_weight: torch.Tensor | None) -> int:
    """How many earlier tokens the two convolutions see: ``k1 + k2 − 2``."""
    return sum(0 if w is None else w.shape[-1] - 1 for w in (conv_weight, mix_weight))


def _qk_mean(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``m_q = (q̃ + k̃_group) / 2`` per query head and ``m_k`` = its mean over each key head's group."""
    m_q = (q + repeat_kv(k, q.shape[1])) / 2
    b, h, n, d = q.shape
    return m_q, m_q.view(b, k.shape[1], h // k.shape[1], n, d).mean(dim=2)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``√d · x / max(‖x‖, eps)`` over the last dim."""
    return math.sqrt(x.shape[-1]) * x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _shift_reference(v: torch.Tensor) -> torch.Tensor:
    """The value shift as a matrix: the last half of the ``Hkv·dv`` channels multiplied by the sub-diagonal."""
    _, hkv, n, dv = v.shape
    channels = torch.arange(hkv * dv, device=v.device).view(hkv, 1, dv)
    shifted = channels >= hkv * dv - (hkv * dv) // 2
    previous = torch.diag(torch.ones(n - 1, dtype=v.dtype, device=v.device), diagonal=-1)
    return torch.where(shifted, previous @ v, v)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, conv_weight: torch.Tensor | None, conv_bias: torch.Tensor | None,
    mix_weight: torch.Tensor | None, mix_bias: torch.Tensor | None, temperature: torch.Tensor | None,
    value_shift: bool, return_lse: bool = False,
) -> Output:
    h = q.shape[1]
    z = torch.cat([q, k], dim=1)
    z = F.pad(z, (0, 0, _reach(conv_weight, mix_weight), 0))
    c = _taps_reference(_taps_reference(z, conv_weight, conv_bias, False), mix_weight, mix_bias, True)
    m_q, m_k = _qk_mean(q, k)
    q_, k_ = _unit(c[:, :h] + m_q), _unit(c[:, h:] + m_k)
    if temperature is not None:
        k_ = k_ * temperature.to(k.dtype).view(1, -1, 1, 1)
    if value_shift:
        v = _shift_reference(v)
    s = dense_scores(q_, k_, scale)
    if bias is not None:
        s = s + bias
    return softmax_rows(s, visible(causal, mask, q, k), repeat_kv(v, h), return_lse)


# ---- the fast path: two conv1d calls on the packed latent, then SDPA ------------------------------------------------

def mix_latents(
    window: torch.Tensor, conv_weight: torch.Tensor | None, conv_bias: torch.Tensor | None,
    mix_weight: torch.Tensor | None, mix_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Both convolutions, without padding, over the packed raw latents ``window (B, Hh, P, d)`` (whose first
    ``k1 + k2 − 2`` tokens are earlier context or zeros): ``(B, Hh, P − k1 − k2 + 2, d)``."""
    b, hh, p, d = window.shape
    x = window.transpose(2, 3).reshape(b, hh * d, p)  # channels head-major, as conv1d wants
    if conv_weight is not None:
        x = F.conv1d(x, conv_weight.to(x.dtype).reshape(hh * d, 1, -1), groups=hh * d)
    if conv_bias is not None:
        x = x + conv_bias.to(x.dtype).reshape(1, hh * d, 1)
    if mix_weight is not None:
        x = F.conv1d(x, mix_weight.to(x.dtype).reshape(hh * d, d, -1), groups=hh)
    if mix_bias is not None:
        x = x + mix_bias.to(x.dtype).reshape(1, hh * d, 1)
    return x.view(b, hh, d, -1).transpose(2, 3).contiguous()  # unit stride on d: the CPU flash kernel needs it


def finish_latents(
    mixed: torch.Tensor, q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention's queries and keys from the convolutions' output ``mixed (B, H+Hkv, T, d)`` and the raw latents
    ``q (B, H, T, d)``, ``k (B, Hkv, T, d)`` of the same tokens: q-k mean added, L2-normalised, key temperature."""
    m_q, m_k = _qk_mean(q, k)
    h = q.shape[1]
    q_ = F.normalize(mixed[:, :h] + m_q, dim=-1, eps=NORM_EPS) * math.sqrt(q.shape[-1])
    k_ = F.normalize(mixed[:, h:] + m_k, dim=-1, eps=NORM_EPS) * math.sqrt(q.shape[-1])
    if temperature is not None:
        k_ = k_ * temperature.to(k_.dtype).view(1, -1, 1, 1)
    return q_, k_


def shift_values(v: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """The value shift of ``v (B, Hkv, T, dv)``: its last half of channels (head-major) taken from the token before,
    ``previous (B, Hkv, 1, dv)`` for the first (zeros when None)."""
    b, hkv, t, dv = v.shape
    flat = v.transpose(1, 2).reshape(b, t, hkv * dv)
    before = (torch.zeros_like(flat[:, :1]) if previous is None
              else previous.transpose(1, 2).reshape(b, 1, hkv * dv))
    keep = hkv * dv - (hkv * dv) // 2
    earlier = torch.cat([before, flat[:, :-1]], dim=1)
    return torch.cat([flat[..., :keep], earlier[..., keep:]], dim=-1).view(b, t, hkv, dv).transpose(1, 2)


def latents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, conv_weight: torch.Tensor | None,
    conv_bias: torch.Tensor | None, mix_weight: torch.Tensor | None, mix_bias: torch.Tensor | None,
    temperature: torch.Tensor | None, value_shift: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, keys and values CCA attends with, from the raw latents ``q̃, k̃, ṽ`` of a whole sequence (what
    :class:`attnzoo.nn.CompressedConvAttention` hands to any softmax-form method)."""
    window = F.pad(torch.cat([q, k], dim=1), (0, 0, _reach(conv_weight, mix_weight), 0))
    q_, k_ = finish_latents(mix_latents(window, conv_weight, conv_bias, mix_weight, mix_bias), q, k, temperature)
    return q_, k_, shift_values(v) if value_shift else v


def sdpa_latent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, mask: torch.Tensor | None,
    bias: torch.Tensor | None, conv_weight: torch.Tensor | None, conv_bias: torch.Tensor | None,
    mix_weight: torch.Tensor | None, mix_bias: torch.Tensor | None, temperature: torch.Tensor | None,
    value_shift: bool, return_lse: bool = False,
) -> Output:
    q_, k_, v_ = latents(q, k, v, conv_weight=conv_weight, conv_bias=conv_bias, mix_weight=mix_weight,
                         mix_bias=mix_bias, temperature=temperature, value_shift=value_shift)
    attend = attention_lse if return_lse else sdpa_attention
    return attend(q_, k_, v_, causal=causal, scale=scale, mask=mask, bias=bias)


# ---- decoding ------------------------------------------------------------------------------------------------------

@dataclass
class CCAState:
    """Decoding state: ``keys (B, Hkv, T, d)`` as attended (normalised, tempered), ``values (B, Hkv, T, dv)`` after
    the shift, ``tail (B, H+Hkv, k1+k2−2, d)`` the last raw packed latents (zeros before the first token) and
    ``last_value (B, Hkv, 1, dv)`` the last raw value."""

    keys: torch.Tensor
    values: torch.Tensor
    tail: torch.Tensor
    last_value: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.tail, self.last_value))


def _advance(
    state: CCAState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, params: dict[str, Any],
) -> tuple[torch.Tensor, CCAState]:
    """Attend ``T`` new tokens (causal among themselves) after ``state`` and return the state that includes them."""
    window = torch.cat([state.tail, torch.cat([q, k], dim=1)], dim=2)
    mixed = mix_latents(window, params["conv_weight"], params["conv_bias"], params["mix_weight"], params["mix_bias"])
    q_, k_ = finish_latents(mixed, q, k, params["temperature"])
    v_ = shift_values(v, state.last_value) if params["value_shift"] else v
    keys, values = torch.cat([state.keys, k_], dim=2), torch.cat([state.values, v_], dim=2)
    out = sdpa_attention(q_, keys, values, causal=True, scale=scale, mask=None, bias=None)
    reach = state.tail.shape[2]
    return out, CCAState(keys, values, window[:, :, window.shape[2] - reach :], v[:, :, -1:])


def _empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict[str, Any]) -> CCAState:
    b, hkv, _, d = k.shape
    reach = _reach(params["conv_weight"], params["mix_weight"])
    return CCAState(k.new_zeros(b, hkv, 0, d), v.new_zeros(b, hkv, 0, v.shape[-1]),
                    q.new_zeros(b, q.shape[1] + hkv, reach, d), v.new_zeros(b, hkv, 1, v.shape[-1]))


DECODER = Decoder.advancing(_empty, _advance, chunked=True)


# ---- cost: KV bytes and FLOPs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cost:
    """What one attention layer costs on ``n`` tokens (FLOPs count a multiply-add as 2).

    ``kv_bytes``: the keys and values a decoder caches; ``attention_flops``: ``q·kᵀ`` and ``p·v`` over the visible
    pairs (``n(n+1)/2`` causal, ``n²`` otherwise); ``projection_flops``: the q/k/v down-projections and the output
    projection; ``conv_flops``: CCA's two convolutions on ``[q; k]`` (0 for MHA)."""

    kv_bytes: int
    attention_flops: int
    projection_flops: int
    conv_flops: int

    @property
    def flops(self) -> int:
        return self.attention_flops + self.projection_flops + self.conv_flops


def cost(
    n: int, dim: int, heads: int, kv_heads: int, head_dim: int, kernel_sizes: tuple[int, int] | None = KERNEL_SIZES,
    causal: bool = True, element_bytes: int = 4,
) -> Cost:
    """The :class:`Cost` of attention with ``heads`` query and ``kv_heads`` key/value heads of ``head_dim`` on ``n``
    tokens of width ``dim``: a CCA layer's latent heads, or (``kernel_sizes=None``) a plain MHA/GQA layer."""
    for name, value in (("n", n), ("dim", dim), ("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim),
                        ("element_bytes", element_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(name, "a positive int", repr(value))
    pairs = n * (n + 1) // 2 if causal else n * n
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    convs = 0
    if kernel_sizes is not None:
        k1, k2 = kernel_sizes
        convs = 2 * n * (q_width + kv_width) * (k1 + head_dim * k2)
    return Cost(
        kv_bytes=2 * n * kv_width * element_bytes,
        attention_flops=2 * 2 * pairs * q_width,
        projection_flops=2 * n * dim * (2 * q_width + 2 * kv_width),
        conv_flops=convs,
    )


register(SPEC, reference, [Backend("sdpa", sdpa_latent, lse=True)], DECODER)
