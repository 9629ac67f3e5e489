"""The fast Walsh–Hadamard transform (FWHT): an orthonormal rotation in O(d log d) per vector.

The Sylvester–Hadamard matrix of size ``d = 2^m`` is ``H_1 = [1]``, ``H_{2n} = [[H_n, H_n], [H_n, −H_n]]``; scaled by
``1/√d`` it is orthonormal and symmetric, so it is its own inverse: ``hadamard(hadamard(x)) = x`` (up to rounding).
Rotating a vector by it spreads every coordinate over all ``d`` outputs with equal magnitude, which flattens outlier
channels before low-bit quantisation (QuaRot, RotateKV).

:func:`hadamard` applies it along the last axis with ``m`` butterfly stages: stage ``j`` pairs entries ``2^j`` apart
and replaces each pair ``(a, b)`` by ``(a + b, a − b)``. Every stage builds a new tensor (nothing is written in place,
so autograd can differentiate through it). ``d`` must be a power of two; other sizes raise an
:class:`~attnzoo.errors.AttnzooError` (callers that need them rotate blocks of a power-of-two size instead, e.g.
one block per group of heads).
"""

from __future__ import annotations

import math

import torch

from attnzoo.errors import fail


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """``x Hᵀ / √d`` along the last axis (``d = x.shape[-1]``, a power of two): the orthonormal Walsh–Hadamard
    rotation, its own inverse. ``name`` is the argument named in the error for another ``d``."""
    d = x.shape[-1]
    if not is_power_of_two(d):
        raise fail(name, "a last dimension that is a power of two (the Walsh–Hadamard transform)", d)
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    half = 1
    while half < d:
        pairs = y.view(-1, d // (2 * half), 2, half)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, d)
        half *= 2
    return (y * (1.0 / math.sqrt(d))).view(*lead, d)


def hadamard_blocks(x: torch.Tensor, block: int, name: str = "x") -> torch.Tensor:
    """The block-diagonal rotation: :func:`hadamard` on each consecutive ``block`` entries of the last axis (its
    size a multiple of ``block``). Orthonormal and its own inverse, like :func:`hadamard`."""
    d = x.shape[-1]
    if d % block:
        raise fail(name, f"a last dimension that is a multiple of the rotation block {block}", d)
    return hadamard(x.reshape(*x.shape[:-1], d // block, block), name).reshape(x.shape)
