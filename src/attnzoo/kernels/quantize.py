"""Grouped asymmetric integer quantisation with real packed storage (2, 4 or 8 bits per value).

The last axis of ``x (..., n)`` is cut into groups of ``group`` consecutive values. A group with minimum ``m`` and
maximum ``M`` is stored as ``b``-bit codes ``c = round((x − z) / s)`` in ``[0, 2^b − 1]``, with two float16 numbers:
the *zero* ``z`` (the value code 0 stands for) and the *scale* ``s``; it is read back as ``x̂ = z + c·s``.

``z`` is ``m`` rounded **down** to float16 and ``s`` is ``(M − z) / (2^b − 1)`` rounded **up** to float16, so every
value of the group lies in ``[z, z + (2^b − 1)·s]``: no code is ever clamped and ``|x − x̂| ≤ s / 2`` holds for the
stored ``s`` (up to float32 rounding); a constant group that float16 holds exactly gets ``s = 0`` and is exact.
Values must lie within float16's range (±65504).

Codes are packed ``8 / b`` to a byte, the first code in the low bits (:func:`pack`, :func:`unpack`): ``n`` values take
``n·b/8`` bytes plus ``4·n/group`` bytes of scales and zeros. At 2 bits and groups of 128 that is 36 bytes per 128
values, 0.14 of float16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attnzoo.errors import fail

BITS = (2, 4, 8)


class Quantized(NamedTuple):
    """Quantised values: ``codes (..., n·bits/8)`` uint8 (packed), ``scale`` and ``zero`` ``(..., n/group)`` float16."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def check_bits(bits: int, name: str = "bits") -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise fail(name, f"one of {BITS} (bits per stored value)", repr(bits))


def check_group(n: int, group: int, name: str = "group") -> None:
    """Groups of ``group`` must tile ``n`` values exactly (and hold whole bytes of codes)."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or n % group or group % 4:
        raise fail(name, f"a multiple of 4 that divides the {n} values quantised together", repr(group))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes (..., n)`` (integers in ``[0, 2^bits)``, ``n`` a multiple of ``8/bits``) → ``(..., n·bits/8)`` uint8."""
    check_bits(bits)
    per = 8 // bits
    if codes.shape[-1] % per:
        raise fail("codes", f"a last dimension that is a multiple of {per} ({bits}-bit codes per byte)",
                   codes.shape[-1])
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per)
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack`: ``(..., m)`` uint8 → codes ``(..., m·8/bits)`` uint8."""
    check_bits(bits)
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], packed.shape[-1] * per)


def quantize(x: torch.Tensor, bits: int, group: int) -> Quantized:
    """Grouped asymmetric ``bits``-bit quantisation of ``x (..., n)`` along its last axis (see the module doc)."""
    check_bits(bits)
    check_group(x.shape[-1], group)
    top = 2**bits - 1
    xg = x.detach().float().reshape(*x.shape[:-1], -1, group)
    zero = _half_toward(xg.amin(-1), -1)
    scale = _half_toward((xg.amax(-1) - zero.float()) / top, 1)
    if not bool(torch.isfinite(scale).all()):
        raise fail("x", "finite values within float16's range (±65504), the range of the stored scales",
                   "values beyond it")
    s = scale.float().unsqueeze(-1)
    steps = torch.where(s > 0, (xg - zero.float().unsqueeze(-1)) / s.clamp(min=torch.finfo(torch.float32).tiny), 0)
    codes = steps.round().clamp(0, top).to(torch.uint8).reshape(x.shape)
    return Quantized(pack(codes, bits), scale, zero)


def dequantize(q: Quantized, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x̂ = zero + code·scale`` ``(..., n)`` in ``dtype`` (the group size is read off the shapes)."""
    codes = unpack(q.codes, bits).float()
    groups = q.scale.shape[-1]
    cg = codes.reshape(*codes.shape[:-1], groups, -1)
    x = cg * q.scale.float().unsqueeze(-1) + q.zero.float().unsqueeze(-1)
    return x.reshape(codes.shape).to(dtype)


def _half_toward(x: torch.Tensor, direction: int) -> torch.Tensor:
    """``x`` (float32) as float16, rounded toward ``+inf`` (``direction`` 1) or ``-inf`` (-1) when not exact."""
    h = x.half()
    off = h.float() < x if direction > 0 else h.float() > x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, direction * float("inf"))), h)


def to_bytes(q: Quantized) -> torch.Tensor:
    """One uint8 row per quantised vector: its packed codes, then its float16 scales and zeros as raw bytes
    ``(..., n·bits/8 + 4·n/group)`` (what a cache stores; :func:`from_bytes` reads it back)."""
    return torch.cat([q.codes, q.scale.contiguous().view(torch.uint8), q.zero.contiguous().view(torch.uint8)], -1)


def from_bytes(row: torch.Tensor, n: int, bits: int, group: int) -> Quantized:
    """The :class:`Quantized` of ``n`` values stored by :func:`to_bytes` in ``row (..., width)``."""
    width, groups = n * bits // 8, n // group
    codes, scale, zero = row.split([width, 2 * groups, 2 * groups], dim=-1)
    return Quantized(codes, scale.contiguous().view(torch.float16), zero.contiguous().view(torch.float16))


def row_bytes(n: int, bits: int, group: int) -> int:
    """Bytes of one :func:`to_bytes` row of ``n`` values."""
    return n * bits // 8 + 4 * (n // group)
