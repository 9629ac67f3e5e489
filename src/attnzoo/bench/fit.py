"""Efficiency length: where a method's cost curve crosses that of standard attention.

CAB (Comprehensive Attention Benchmarking on Long Sequence Modeling, arXiv:2210.07661) defines the *efficiency
length* of an efficient attention as the sequence length at which its running-time (or memory) curve intersects that
of vanilla attention: beyond it the efficient method is cheaper.

Choice made here: each curve is fitted as a power law ``cost = c · N^p`` by least squares on ``(log N, log cost)``, over
every measured length (at least two). The fitted exponent ``p`` is reported too (≈2 for quadratic attention, ≈1 for
linear). With ``d(x) = log cost_method − log cost_sdpa`` linear in ``x = log N`` the answers are:

- ``"always"``: the method is cheaper over the whole measured range and does not grow faster than SDPA;
- ``"never"``: it is not cheaper anywhere in the measured range and does not grow slower (or the crossing would lie
  beyond :data:`MAX_EXTRAPOLATION` times the longest measured length, too far to trust);
- ``"crossing"``: the fitted curves cross at ``length`` and the method is the cheaper one beyond it (``extrapolated``
  says whether ``length`` lies past the measured range);
- ``"until"``: the method is cheaper at short lengths but grows faster, and SDPA becomes the cheaper one beyond
  ``length``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

MAX_EXTRAPOLATION = 64.0


@dataclass(frozen=True)
class PowerLaw:
    """``cost = exp(intercept) · N^exponent``."""

    intercept: float
    exponent: float

    def log_at(self, length: float) -> float:
        return self.intercept + self.exponent * math.log(length)


@dataclass(frozen=True)
class EfficiencyLength:
    kind: str  # "always" | "never" | "crossing" | "until" | "unknown"
    length: float | None
    exponent: float | None
    baseline_exponent: float | None
    extrapolated: bool = False
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """A short cell for tables: ``always``, ``never``, ``≥ 1.2k``, ``≤ 3k``, ``—``."""
        if self.kind in ("always", "never"):
            return self.kind
        if self.kind == "crossing" and self.length is not None:
            return f"{'~' if self.extrapolated else ''}{short_length(self.length)}"
        if self.kind == "until" and self.length is not None:
            return f"until {short_length(self.length)}"
        return "—"


def short_length(n: float) -> str:
    """``950``, ``1.2k``, ``3.4M``: a length in a few characters."""
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def fit_power_law(lengths: Sequence[float], costs: Sequence[float]) -> PowerLaw:
    """Least-squares line through ``(log N, log cost)``; needs two distinct lengths and positive costs."""
    pairs = [(math.log(n), math.log(c)) for n, c in zip(lengths, costs, strict=True) if n > 0 and c > 0]
    xs = {x for x, _ in pairs}
    if len(xs) < 2:
        raise ValueError("fit_power_law needs positive costs at two or more distinct lengths")
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    slope = sxy / sxx
    return PowerLaw(intercept=my - slope * mx, exponent=slope)


def efficiency_length(
    lengths: Sequence[float],
    costs: Sequence[float],
    baseline_lengths: Sequence[float],
    baseline_costs: Sequence[float],
) -> EfficiencyLength:
    """The CAB efficiency length of a cost curve against the baseline's (see the module docstring)."""
    try:
        mine = fit_power_law(lengths, costs)
        base = fit_power_law(baseline_lengths, baseline_costs)
    except ValueError as e:
        return EfficiencyLength("unknown", None, None, None, note=str(e))
    common = sorted(set(lengths) & set(baseline_lengths))
    lo, hi = (common[0], common[-1]) if common else (min(lengths), max(lengths))
    gap_lo = mine.log_at(lo) - base.log_at(lo)
    gap_hi = mine.log_at(hi) - base.log_at(hi)
    slope = mine.exponent - base.exponent
    kwargs: dict[str, Any] = {"exponent": mine.exponent, "baseline_exponent": base.exponent}
    if abs(slope) < 1e-9:
        return EfficiencyLength("always" if gap_lo < 0 else "never", None, **kwargs)
    log_cross = (base.intercept - mine.intercept) / slope
    far = log_cross > math.log(hi * MAX_EXTRAPOLATION)
    cross = math.exp(min(log_cross, 700.0))
    if slope < 0:  # grows slower than SDPA: cheaper beyond the crossing
        if gap_lo < 0:
            return EfficiencyLength("always", None, **kwargs)
        if far:
            return EfficiencyLength("never", None, **kwargs, note=f"fitted crossing {cross:.3g} is beyond the range")
        return EfficiencyLength("crossing", cross, **kwargs, extrapolated=cross > hi)
    # grows faster than SDPA: cheaper only before the crossing, if at all
    if gap_hi < 0:
        if far:
            return EfficiencyLength("always", None, **kwargs, note=f"grows faster; fitted crossing {cross:.3g}")
        return EfficiencyLength("until", cross, **kwargs, extrapolated=True)
    if gap_lo < 0:
        return EfficiencyLength("until", cross, **kwargs)
    return EfficiencyLength("never", None, **kwargs)
