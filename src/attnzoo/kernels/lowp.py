"""Low-precision building blocks: integer matrix products, symmetric grouped quantisation, float-format rounding.

- :func:`int8_matmul`: ``a (m, k) @ b (k, n)`` of int8 matrices as a real integer product with int32 results
  (``torch._int_mm`` where it exists), exact: ``|a_ij b_jl| ≤ 127² = 16129``, so any ``k < 2^31 / 16129 ≈ 133 000``
  fits int32 without overflow. ``torch._int_mm`` on CPU (PyTorch 2.13) takes any shape; on CUDA it needs
  ``m > 16`` and ``k``, ``n`` multiples of 8, so the operands are zero-padded there (zeros add nothing to a dot
  product) and the result sliced. Without ``torch._int_mm`` the product runs in int32 (CPU) or float64 (elsewhere:
  every partial sum is an integer below 2^53, so float64 is exact too).
- :func:`grouped_int_scores`: ``Q₈ K₈ᵀ`` for ``(B, H, r, D)`` and ``(B, Hkv, Skv, D)`` int8 tensors, the ``H / Hkv``
  query heads sharing a key head stacked as rows of one :func:`int8_matmul` (no key copies for GQA).
- :func:`quantize_symmetric`: tokens cut into groups (any assignment of tokens to groups: consecutive blocks, or the
  strided per-thread groups of SageAttention2), one scale ``δ = max|x| / qmax`` per group, codes
  ``round(x / δ)`` (half away from zero) in ``[−qmax, qmax]`` as int8; the scale is returned per token.
- :func:`round_half_away`, :func:`to_fp16`, :func:`to_fp8_e4m3`, :func:`truncate_fp22`: the roundings of the
  formats a GPU kernel computes in, emulated on float32 tensors (the result is float32 holding representable
  values). FP22 is the accumulator of FP8 tensor-core instructions on Ada/Hopper (1 sign, 8 exponent, 13 mantissa
  bits, as the SageAttention2 paper reports it); we truncate the 10 lowest mantissa bits of a float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_E4M3_MAX = 448.0  # largest finite float8 e4m3 (fn) value
FP22_DROPPED_BITS = 10  # float32 keeps 23 mantissa bits, FP22 13


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact int32 product of int8 matrices ``a (m, k)`` and ``b (k, n)`` (see the module docstring)."""
    a, b = _row_major(a), _row_major(b)
    if not hasattr(torch, "_int_mm"):
        if a.device.type == "cpu":
            return a.to(torch.int32) @ b.to(torch.int32)
        return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    pad_m, pad_k, pad_n = max(0, 17 - m), -k % 8, -n % 8
    padded = torch._int_mm(F.pad(a, (0, pad_k, 0, pad_m)), F.pad(b, (0, pad_n, 0, pad_k)))
    return padded[:m, :n]


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """``x (m, n)`` with the strides ``(n, 1)``, copied if it has others. ``torch._int_mm`` reads the leading
    dimension from the strides, and views with a size-1 axis can carry any stride there (a transposed ``(n, 1)``
    view is ``(1, n)`` with strides ``(1, 1)``, which PyTorch still calls contiguous): measured on CPU, such an
    operand gave wrong products."""
    if x.stride() == (x.shape[1], 1):
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def grouped_int_scores(q_rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q kᵀ`` in int32 for int8 ``q_rows (B, H, r, D)`` and ``k (B, Hkv, Skv, D)``: a ``(B, H, r, Skv)`` tensor,
    one :func:`int8_matmul` per (batch, key head) with that head's ``H / Hkv`` query heads stacked as rows."""
    b, h, r, d = q_rows.shape
    hkv, skv = k.shape[1], k.shape[2]
    stacked = q_rows.reshape(b, hkv, (h // hkv) * r, d)
    keys = k.transpose(-1, -2).contiguous()  # (B, Hkv, D, Skv): each head's operand row-major, copied once
    out = torch.empty(b, hkv, (h // hkv) * r, skv, dtype=torch.int32, device=q_rows.device)
    for i in range(b):
        for g in range(hkv):
            out[i, g] = int8_matmul(stacked[i, g], keys[i, g])
    return out.view(b, h, r, skv)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, halves away from zero (``x + 0.5·sign(x)`` truncated, as the kernels do)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_symmetric(
    x: torch.Tensor, groups: torch.Tensor, count: int, qmax: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantisation of ``x (B, H, N, D)`` (float32) by token groups.

    ``groups (N,)`` gives each token's group in ``[0, count)``. Each group of each (batch, head) gets the scale
    ``δ = max |x| / qmax`` over its tokens and channels (at least the smallest normal float32, so an all-zero group
    gives codes 0 rather than a division by zero); codes are ``round_half_away(x / δ)`` in ``[−qmax, qmax]``.
    Returns ``(codes int8 (B, H, N, D), scale (B, H, N) float32)`` with each token's group scale: ``x ≈ codes ·
    scale[..., None]``.
    """
    b, h, n, _ = x.shape
    row_max = x.abs().amax(dim=-1)
    group_max = row_max.new_zeros(b, h, count).scatter_reduce(-1, groups.expand(b, h, n), row_max, "amax")
    scale = (group_max / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    per_token = scale.gather(-1, groups.expand(b, h, n))
    codes = round_half_away(x / per_token.unsqueeze(-1)).clamp_(-qmax, qmax)
    return codes.to(torch.int8), per_token


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16 (nearest, ties to even; overflow to ±inf), held in float32."""
    return x.to(torch.float16).to(torch.float32)


def to_fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` (within ±448) rounded to float8 e4m3 (nearest, ties to even), held in float32."""
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def truncate_fp22(x: torch.Tensor) -> torch.Tensor:
    """Float32 ``x`` with its 10 lowest mantissa bits cleared: the FP22 accumulator (13 mantissa bits), rounding
    toward zero."""
    keep = ~((1 << FP22_DROPPED_BITS) - 1)
    return (x.contiguous().view(torch.int32) & keep).view(torch.float32)
