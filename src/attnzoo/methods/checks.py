"""Parameter checks that several methods share, and the per-axis parameter helpers they are built on.

A ``Param.check`` is ``check(value, call) -> str | None``: ``None`` when ``value`` is valid for the call, otherwise
what was expected (the registry's error names the parameter and shows the value). The checks here are the ones more
than one method uses; a check only one method needs stays in that method's file. Modelled on NATTEN's
``utils/checks.py``: one place for layout, per-axis, divisor and kernel-size rules.

Per-axis parameters (``kernel_size``, ``dilation``, ``block_size``, ...) are an int (the same on every axis) or a tuple
with one int per axis of the ``layout`` (the spatial shape of the sequence, row-major; ``None`` means ``(seq,)``).
A check that needs the layout returns ``None`` when the layout itself is invalid: the layout's own check reports it.

NATTEN's parameters (``kernel_size``, ``dilation``, ``layout``, ``is_causal``), which neighborhood attention (P2) and
its strided generalisation (P3) both take, are defined here once as :data:`NATTEN_PARAMS`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo.registry import Call, Check, Param


def layout_shape(seq: int, layout: tuple[int, ...] | None) -> tuple[int, ...]:
    """The layout of a sequence of ``seq`` tokens as a tuple: ``(seq,)`` when ``layout`` is None."""
    return (seq,) if layout is None else tuple(layout)


def per_axis_values(value: Any, ndim: int) -> tuple[Any, ...]:
    """A per-axis parameter as a tuple of ``ndim`` values (an int or bool means the same on every axis)."""
    return tuple(value) if isinstance(value, tuple) else (value,) * ndim


def layout_and_sizes(seq: int, layout: Any, size: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The layout (``(seq,)`` when None) and a per-axis size given as an int or a tuple, as tuples."""
    shape = layout_shape(seq, layout)
    return shape, per_axis_values(size, len(shape))


def smallest_divisor(n: int) -> int:
    """The smallest divisor of ``n`` above 1 (``n`` itself if prime; 1 for 1): a valid size for any length."""
    return next((d for d in range(2, n) if n % d == 0), n)


def _layout_problem(value: Any, call: Call, max_ndim: int | None) -> str | None:
    if value is None:
        return None
    most = f"1 to {max_ndim}" if max_ndim else "one or more"
    if (not isinstance(value, tuple) or not value or (max_ndim is not None and len(value) > max_ndim)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)):
        return f"a tuple of {most} positive ints (the spatial shape of the sequence)"
    if call.decoding and math.prod(value) < call.length:
        return f"a shape of at least the {call.length} tokens decoded so far (the whole decoded sequence's grid)"
    if not call.decoding and math.prod(value) != call.seq_q:
        return f"a shape whose product is the sequence length {call.seq_q}"
    return None


def check_layout(value: Any, call: Call) -> str | None:
    """``layout``: None, or a tuple of positive ints (any number of axes) whose product is the sequence length."""
    return _layout_problem(value, call, None)


def check_layout_3d(value: Any, call: Call) -> str | None:
    """``layout`` with 1 to 3 axes (neighborhoods, halos): None, or 1 to 3 positive ints multiplying to the length."""
    return _layout_problem(value, call, 3)


def per_axis_ints(name: str, value: Any, call: Call, low: int) -> tuple[int, ...] | str:
    """``value`` (an int or a tuple, one per layout axis) as a tuple of ints ``>= low``, or why it is not one.

    Returns ``()`` when the layout is invalid (its own check reports it).
    """
    layout = call.params.get("layout")
    if check_layout(layout, call) is not None:
        return ()
    ndim = 1 if layout is None else len(layout)
    if isinstance(value, bool) or not isinstance(value, (int, tuple)):
        return f"an int or a tuple of {ndim} ints for {name}"
    if isinstance(value, tuple):
        if len(value) != ndim:
            return f"an int or a tuple of {ndim} ints (one per layout axis) for {name}"
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return f"ints in the {name} tuple"
    values = per_axis_values(value, ndim)
    if any(x < low for x in values):
        return f"values >= {low}"
    return values


def per_axis_check(name: str, low: int) -> Check:
    """A ``Param.check`` for the per-axis parameter ``name``: an int or one int per layout axis, each ``>= low``."""

    def check(value: Any, call: Call) -> str | None:
        ints = per_axis_ints(name, value, call, low)
        return ints if isinstance(ints, str) else None

    return check


def divides_layout(name: str) -> Check:
    """A ``Param.check`` for the per-axis size ``name``, which must divide each axis of the layout."""

    def check(value: Any, call: Call) -> str | None:
        sizes = per_axis_ints(name, value, call, 1)
        if isinstance(sizes, str):
            return sizes
        layout = layout_shape(call.length, call.params.get("layout"))
        if sizes and any(n % s for n, s in zip(layout, sizes, strict=True)):
            return f"sizes dividing each axis of the layout {layout}"
        return None

    return check


def check_kernel_size(value: Any, call: Call) -> str | None:
    """NATTEN's ``kernel_size``: odd per axis, and ``kernel_size · dilation <=`` the axis length (so every dilation
    group has at least ``kernel_size`` positions)."""
    kernel = per_axis_ints("kernel_size", value, call, 1)
    if isinstance(kernel, str):
        return kernel
    layout = call.params.get("layout")
    if check_layout_3d(layout, call) is not None:
        return None
    dilation = per_axis_ints("dilation", call.params.get("dilation", 1), call, 1)
    if isinstance(dilation, str):
        return None  # the dilation's own check reports it
    for k, d, n in zip(kernel, dilation, layout_shape(call.length, layout), strict=True):
        if k % 2 == 0:
            return "odd kernel sizes"
        if k * d > n:
            return f"kernel_size · dilation <= the axis length (axis of {n} with dilation {d})"
    return None


def check_is_causal(value: Any, call: Call) -> str | None:
    """NATTEN's ``is_causal``: a bool, or a tuple of one bool per layout axis."""
    layout = call.params.get("layout")
    if check_layout_3d(layout, call) is not None:
        return None
    ndim = len(layout_shape(call.length, layout))
    if isinstance(value, tuple) and (len(value) != ndim or not all(isinstance(x, bool) for x in value)):
        return f"a bool or a tuple of {ndim} bools (one per layout axis)"
    return None


NATTEN_PARAMS: tuple[Param, ...] = (
    Param("kernel_size", (int, tuple), 7, "neighborhood size per axis (odd int or tuple)", low=1,
          check=check_kernel_size),
    Param("dilation", (int, tuple), 1, "dilation per axis (int or tuple)", low=1, check=per_axis_check("dilation", 1)),
    Param("layout", (tuple,), None, "spatial shape of the sequence, 1 to 3 axes; None means (seq,)",
          check=check_layout_3d),
    Param("is_causal", (bool, tuple), False, "causal masking per axis (bool or tuple); causal=True sets all",
          check=check_is_causal),
)
"""NATTEN's ``kernel_size``, ``dilation``, ``layout`` and ``is_causal``, with their defaults and checks."""


def per_axis_causal(causal: bool, is_causal: Any, ndim: int) -> tuple[bool, ...]:
    """NATTEN's causal masking per axis: an axis is causal if ``causal`` or its ``is_causal`` entry says so."""
    return tuple(c or causal for c in per_axis_values(is_causal, ndim))


def tensor_shape(shape_of: Any, dims: str, floats_pass: bool = False) -> Check:
    """A check that a tensor parameter is floating point with the shape ``shape_of(call)`` (``dims`` names its axes in
    the message); with ``floats_pass`` a plain float (one value for every head) is valid too."""
    def check(value: Any, call: Call) -> str | None:
        if floats_pass and not isinstance(value, torch.Tensor):
            return None
        want = shape_of(call)
        if tuple(value.shape) != want:
            return f"{'a float or ' if floats_pass else ''}a tensor of shape {want} ({dims})"
        if not value.is_floating_point():
            return "a floating-point tensor"
        return None

    return check
