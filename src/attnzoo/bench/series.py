"""The data the report's figures draw, shaped once for the static plots (:mod:`~attnzoo.bench.plots`) and the
interactive ones (:mod:`~attnzoo.bench.interactive`).

A run measures up to a hundred methods, so every figure groups them by the method's *family* (softmax, structured,
sparse, linear, …, in the catalogue's order: :data:`attnzoo.registry.FAMILIES`) and draws the SDPA baseline in each
group. A method the registry does not know (a plugin that was not imported when the report is rendered) falls in the
family ``"other"``, drawn last.

- :func:`curves`: each method and backend's measured points against length, at one pattern and mode;
- :func:`by_family`: curves (or any labelled items) grouped by family, baseline left out;
- :func:`headline_pattern`: the pattern the static time and memory figures show (the one with the most curves);
- :func:`line_labels`: the name a line or bar carries (the method; ``method (backend)`` only where a method was
  measured with several backends).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from attnzoo.bench.efficiency import BASELINE
from attnzoo.bench.tables import PATTERN_ORDER
from attnzoo.errors import AttnzooError
from attnzoo.registry import FAMILIES, get

BASELINE_LABEL = "SDPA"
OTHER_FAMILY = "other"


@dataclass(frozen=True)
class Curve:
    """One method and backend at one pattern and mode: its ``ok`` rows with the plotted field, by length."""

    method: str
    backend: str
    family: str
    label: str
    rows: tuple[dict[str, Any], ...]

    @property
    def is_baseline(self) -> bool:
        return (self.method, self.backend) == BASELINE

    @property
    def lengths(self) -> list[int]:
        return [r["length"] for r in self.rows]

    def values(self, field: str, scale: float = 1.0) -> list[float]:
        return [r[field] * scale for r in self.rows]


def family_of(method: str) -> str:
    """The registered method's family (``"linear"``); :data:`OTHER_FAMILY` for a name the registry does not know."""
    try:
        return get(method).spec.family
    except AttnzooError:
        return OTHER_FAMILY


def family_rank(family: str) -> int:
    """Position of ``family`` in the catalogue's order; an unknown family sorts after every known one."""
    names = [f.name for f in FAMILIES]
    return names.index(family) if family in names else len(names)


def line_labels(keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """A label per ``(method, backend)``: the method's name, with the backend only where the same method appears
    with several backends; the baseline is :data:`BASELINE_LABEL`."""
    keys = list(dict.fromkeys(keys))
    backends: dict[str, int] = defaultdict(int)
    for method, _ in keys:
        backends[method] += 1
    return {(m, b): BASELINE_LABEL if (m, b) == BASELINE else m if backends[m] == 1 else f"{m} ({b})"
            for m, b in keys}


def curves(results: dict[str, Any], mode: str, pattern: str, field: str) -> list[Curve]:
    """Every method and backend measured at ``pattern`` and ``mode`` with a value for ``field``, the baseline
    first, then by family and name; failed and skipped rows are left out."""
    points: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results.get("efficiency", []):
        if r.get("status") == "ok" and r["mode"] == mode and r["pattern"] == pattern and r.get(field):
            points[(r["method"], r["backend"])].append(r)
    labels = line_labels(points)
    out = [Curve(m, b, family_of(m), labels[(m, b)], tuple(sorted(rows, key=lambda r: r["length"])))
           for (m, b), rows in points.items()]
    return sorted(out, key=lambda c: (not c.is_baseline, family_rank(c.family), c.label))


def by_family(items: Iterable[Curve]) -> dict[str, list[Curve]]:
    """The non-baseline curves grouped by family, families in catalogue order."""
    groups: dict[str, list[Curve]] = defaultdict(list)
    for c in items:
        if not c.is_baseline:
            groups[c.family].append(c)
    return {f: groups[f] for f in sorted(groups, key=family_rank)}


def baseline(items: Iterable[Curve]) -> Curve | None:
    """The SDPA curve among ``items``, if it was measured."""
    return next((c for c in items if c.is_baseline), None)


def headline_pattern(results: dict[str, Any], mode: str, field: str) -> str | None:
    """The pattern with the most curves measured at two or more lengths (ties go to :data:`PATTERN_ORDER`'s
    order); ``None`` where no pattern has such a curve."""
    counts = {p: sum(len(c.rows) >= 2 for c in curves(results, mode, p, field)) for p in PATTERN_ORDER}
    best = max(PATTERN_ORDER, key=lambda p: counts[p])
    return best if counts[best] else None
