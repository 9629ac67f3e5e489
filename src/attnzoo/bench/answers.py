"""The answers a report opens with, computed from a run's results (pure functions, no I/O).

A user opens ``report.html`` (or ``summary.md``) with three questions; both pages render the same answers from here:

- *Which method is fastest for my pattern?* :func:`headlines`: per pattern (self/cross × causal/noncausal) and mode,
  at the *headline length* (the longest length at which SDPA, the baseline, was measured for that pattern and mode),
  the fastest methods with their speed-up over SDPA, memory ratio, exactness or difference from softmax attention
  (relative L2 at default settings, from the approximation phase) and quality (accuracy on the run's quality task,
  the quick MQAR for ``--quick``). A method measured through several backends counts once, by its fastest backend;
  softmax itself, through any backend, is the baseline and no contender.
  "Faster than SDPA" means beyond the noise: the two medians' IQR bands (median ± IQR/2) do not overlap.
- *Where does a family start to pay?* :func:`crossovers`: per family, pattern, mode and metric (time, peak memory),
  the method whose efficiency length (CAB, :mod:`attnzoo.bench.fit`) is the best: cheaper at every measured length,
  then the shortest crossing measured, then the shortest extrapolated one, then "until" (cheaper only below a
  length), then never. The text says which: ``2.1k measured``, ``> 1024 (extrapolated ~9.0k)``.
- *What did not run, and why?* :func:`missing`: every case without a result (efficiency, approximation, quality,
  fresh-process memory) grouped by status and reason, counted, with the methods concerned; failures (error, crash,
  timeout, out of memory) first, then unsupported, then skipped.

A method's family and exactness come from the registry (``attnzoo.get(name).spec``); a method this process has not
registered (results of a run that imported a plugin) is of family ``other``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from attnzoo.bench.efficiency import BASELINE, MODES
from attnzoo.bench.fit import short_length
from attnzoo.bench.quality import untrained
from attnzoo.bench.tables import PATTERN_ORDER, md_table, ratio_spread, round_to_noise, task_label
from attnzoo.errors import AttnzooError
from attnzoo.registry import FAMILIES, get

TOP = 3  # methods named per pattern and mode
FAILED = ("error", "crashed", "timeout", "oom")
MODE_TITLES = {"fwd": "forward", "fwd+bwd": "forward + backward"}
OTHER = "other"
SWEEP_REFUSED = ("a setting of the approximation sweep (one parameter at ½× or 2× its default, or another choice) "
                 "that the method refuses")


@dataclass(frozen=True)
class Contender:
    """One method at a headline length."""

    method: str
    backend: str
    family: str
    time_s: float
    time_iqr_s: float | None
    speedup: float | None  # SDPA's time / this method's, same pattern, mode and length
    speedup_spread: float | None  # its spread from both IQRs
    memory_ratio: float | None  # peak memory / SDPA's
    exact: bool | None  # spec.exact (None: a method this process does not know)
    error: float | None  # relative L2 from softmax attention at default settings on this pattern
    accuracy: float | None  # mean accuracy on the run's quality task(s)
    chance: float | None
    clear: bool  # differs from SDPA's time beyond the noise (:func:`beyond_noise`)

    @property
    def faster(self) -> bool:
        """Faster than SDPA beyond the noise."""
        return self.clear and self.speedup is not None and self.speedup > 1


@dataclass(frozen=True)
class Headline:
    """The fastest methods of one pattern and mode at its headline length."""

    pattern: str
    mode: str
    length: int
    baseline_time_s: float | None
    baseline_iqr_s: float | None
    fastest: tuple[Contender, ...]
    measured: int  # methods measured at this length (SDPA not counted)
    faster: int  # of which faster than SDPA beyond the noise
    shorter: int = 0  # methods measured in this pattern and mode only at shorter lengths (stopped or skipped)


@dataclass(frozen=True)
class Crossover:
    """The best efficiency length of a family for one pattern, mode and metric."""

    family: str
    pattern: str
    mode: str
    metric: str  # "time" | "memory"
    method: str
    backend: str
    kind: str  # "always" | "crossing" | "until" | "never" (fit.EfficiencyLength)
    length: float | None
    extrapolated: bool
    shortest: int  # the lengths the method was measured at
    longest: int


@dataclass(frozen=True)
class Missing:
    """Cases without a result that share a status and a reason."""

    status: str
    reason: str
    cases: int
    methods: tuple[str, ...]
    phases: tuple[str, ...]


@dataclass(frozen=True)
class Answers:
    headlines: tuple[Headline, ...]
    crossovers: tuple[Crossover, ...]
    missing: tuple[Missing, ...]
    quality_task: str  # the task(s) behind the quality column, e.g. ``mqar (pairs=4, vocab=16)``; "" when none


def method_info(name: str) -> tuple[str, bool | None]:
    """``(family, exact)`` of a registered method; ``("other", None)`` for one this process does not know."""
    try:
        spec = get(name).spec
    except AttnzooError:
        return OTHER, None
    return spec.family, spec.exact


def family_order() -> list[str]:
    """The families in catalogue order, then ``other``."""
    return [f.name for f in FAMILIES] + [OTHER]


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def beyond_noise(a: float, iqr_a: float | None, b: float, iqr_b: float | None) -> bool:
    """Whether medians ``a`` and ``b`` differ beyond their noise: the bands median ± IQR/2 do not overlap (an unknown
    IQR counts as zero)."""
    return abs(a - b) > ((iqr_a or 0.0) + (iqr_b or 0.0)) / 2


def _errors(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Relative L2 from softmax at default settings, by (method, pattern)."""
    return {(r["method"], r["pattern"]): r["rel_l2"] for r in _ok(results.get("approximation", []))
            if not r.get("setting") and r.get("rel_l2") is not None}


def _accuracies(results: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Mean accuracy and chance of each method over its trained quality rows (a sweep's, not a study's)."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in _ok(results.get("quality", [])):
        if "setting" not in r and r.get("accuracy") is not None:
            by[r["method"]].append(r)
    return {m: (sum(r["accuracy"] for r in rs) / len(rs), sum(r["chance"] for r in rs) / len(rs))
            for m, rs in by.items()}


def headlines(results: dict[str, Any], top: int = TOP) -> list[Headline]:
    """Per pattern and mode with a measured SDPA, the ``top`` fastest methods at the headline length."""
    ok = [r for r in _ok(results.get("efficiency", [])) if r.get("time_median_s")]
    errors, accuracies = _errors(results), _accuracies(results)
    out = []
    for mode in MODES:
        for pattern in PATTERN_ORDER:
            rows = [r for r in ok if r["pattern"] == pattern and r["mode"] == mode]
            bases = [r for r in rows if (r["method"], r["backend"]) == BASELINE]
            if not bases:
                continue
            base = max(bases, key=lambda r: r["length"])
            best: dict[str, dict[str, Any]] = {}
            for r in rows:
                if r["length"] != base["length"] or r["method"] == BASELINE[0]:
                    continue
                if r["method"] not in best or r["time_median_s"] < best[r["method"]]["time_median_s"]:
                    best[r["method"]] = r
            ranked = sorted(best.values(), key=lambda r: r["time_median_s"])
            contenders = [_contender(r, base, errors, accuracies) for r in ranked]
            shorter = {r["method"] for r in rows if r["method"] not in best and r["method"] != BASELINE[0]}
            out.append(Headline(pattern, mode, base["length"], base["time_median_s"], base.get("time_iqr_s"),
                                tuple(contenders[:top]), len(contenders), sum(c.faster for c in contenders),
                                len(shorter)))
    return out


def _contender(r: dict[str, Any], base: dict[str, Any], errors: dict[tuple[str, str], float],
               accuracies: dict[str, tuple[float, float]]) -> Contender:
    family, exact = method_info(r["method"])
    t, b = r["time_median_s"], base["time_median_s"]
    speedup = b / t
    accuracy, chance = accuracies.get(r["method"], (None, None))
    memory = (r["peak_bytes"] / base["peak_bytes"]) if r.get("peak_bytes") and base.get("peak_bytes") else None
    return Contender(
        method=r["method"], backend=r["backend"], family=family, time_s=t, time_iqr_s=r.get("time_iqr_s"),
        speedup=speedup, speedup_spread=ratio_spread(speedup, base, r), memory_ratio=memory,
        exact=exact, error=errors.get((r["method"], r["pattern"])), accuracy=accuracy, chance=chance,
        clear=beyond_noise(t, r.get("time_iqr_s"), b, base.get("time_iqr_s")))


_KIND_RANK = {"always": 0, "crossing": 1, "until": 3, "never": 4}


def _crossover_rank(c: Crossover) -> tuple[int, float]:
    rank = _KIND_RANK[c.kind] + (c.kind == "crossing" and c.extrapolated)
    length = c.length if c.length is not None else 0.0
    return rank, -length if c.kind == "until" else length


def crossovers(results: dict[str, Any]) -> list[Crossover]:
    """Per family, pattern, mode and metric, the method with the best efficiency length (module docstring), in
    catalogue order of the families."""
    spans: dict[tuple, list[int]] = defaultdict(list)
    for r in _ok(results.get("efficiency", [])):
        spans[(r["method"], r["backend"], r["pattern"], r["mode"])].append(r["length"])
    best: dict[tuple[str, str, str, str], Crossover] = {}
    for e in results.get("efficiency_length", []):
        lengths = spans.get((e["method"], e["backend"], e["pattern"], e["mode"]))
        if e["kind"] not in _KIND_RANK or not lengths or e["method"] == BASELINE[0]:
            continue
        family = method_info(e["method"])[0]
        c = Crossover(family, e["pattern"], e["mode"], e["metric"], e["method"], e["backend"], e["kind"],
                      e.get("length"), bool(e.get("extrapolated")), min(lengths), max(lengths))
        key = (family, e["pattern"], e["mode"], e["metric"])
        if key not in best or _crossover_rank(c) < _crossover_rank(best[key]):
            best[key] = c
    order = family_order()
    return sorted(best.values(), key=lambda c: (MODES.index(c.mode) if c.mode in MODES else 9,
                                                order.index(c.family) if c.family in order else len(order),
                                                PATTERN_ORDER.index(c.pattern), c.metric != "time"))


def missing(results: dict[str, Any]) -> list[Missing]:
    """Every case without a result, grouped by status and reason (module docstring). Reasons that differ only in
    their numbers (``got 4``, ``got 14``) form one group, shown by its first reason; the settings of the
    approximation sweep that a method refuses form one group of their own."""
    groups: dict[tuple[str, str], Missing] = {}
    for phase in ("efficiency", "approximation", "quality", "fresh_memory"):
        for r in results.get(phase, []):
            status = r.get("status", "ok")
            if status == "ok":
                continue
            reason = r.get("reason", "")
            if phase == "approximation" and r.get("setting") and status == "unsupported":
                reason = SWEEP_REFUSED
            key = (status, re.sub(r"\d+(\.\d+)?", "#", reason))
            old = groups.get(key, Missing(status, reason, 0, (), ()))
            groups[key] = Missing(status, old.reason, old.cases + 1,
                                  tuple(sorted({*old.methods, r.get("method", "?")})),
                                  tuple(sorted({*old.phases, phase.replace("_", " ")})))
    return sorted(groups.values(), key=lambda m: (m.status not in FAILED, m.status != "unsupported", -m.cases,
                                                  m.reason))


def answers(results: dict[str, Any], top: int = TOP) -> Answers:
    """Everything the report opens with."""
    tasks = sorted({task_label(r["task"]) for r in _ok(results.get("quality", [])) if "setting" not in r})
    return Answers(tuple(headlines(results, top)), tuple(crossovers(results)), tuple(missing(results)),
                   ", ".join(tasks))


# Texts: the HTML page and summary.md say the same thing in the same words.


def ms_text(seconds: float, iqr_s: float | None) -> str:
    """``12.3 ms``: a median time rounded to its IQR."""
    return f"{round_to_noise(seconds * 1e3, None if iqr_s is None else iqr_s * 1e3)} ms"


def speedup_text(c: Contender) -> str:
    """``2.4× faster``, ``1.3× slower``, or ``≈ SDPA`` when the difference is inside the noise."""
    if c.speedup is None:
        return "—"
    if not c.clear:
        return f"≈ SDPA ({round_to_noise(c.speedup, c.speedup_spread)}×)"
    if c.speedup >= 1:
        return f"{round_to_noise(c.speedup, c.speedup_spread)}× faster"
    inverse = 1 / c.speedup
    spread = None if c.speedup_spread is None else c.speedup_spread / c.speedup**2
    return f"{round_to_noise(inverse, spread)}× slower"


def memory_text(c: Contender) -> str:
    """``0.25×``: peak memory relative to SDPA's."""
    return "—" if c.memory_ratio is None else f"{c.memory_ratio:.2g}×"


def error_text(c: Contender) -> str:
    """The relative L2 difference from softmax with the method's kind: ``= softmax`` (below 1e-3), ``exact, 3.1``
    (an exact method of another function), ``approx., 0.04`` (an approximate method)."""
    kind = {True: "exact", False: "approx.", None: "—"}[c.exact]
    if c.error is None:
        return kind
    return "= softmax" if c.error < 1e-3 else f"{kind}, {c.error:.2g}"


def accuracy_text(c: Contender) -> str:
    """``MQAR 0.98``, ``untrained`` near chance, or an em dash when not trained."""
    if c.accuracy is None or c.chance is None:
        return "—"
    return "untrained" if untrained(c.accuracy, c.chance) else f"{c.accuracy:.2f}"


def crossover_text(c: Crossover) -> str:
    """``always (from 256)``, ``2.1k measured``, ``> 1024 (extrapolated ~9.0k)``, ``until 3.0k``,
    ``never (to 1024)``."""
    if c.kind == "always":
        return f"always (from {c.shortest})"
    if c.kind == "crossing" and c.length is not None:
        if c.extrapolated:
            return f"> {c.longest} (extrapolated ~{short_length(c.length)})"
        return f"{short_length(c.length)} measured"
    if c.kind == "until" and c.length is not None:
        return f"until {short_length(c.length)}{' (extrapolated)' if c.extrapolated else ''}"
    return f"never (to {c.longest})"


def headline_title(h: Headline) -> str:
    """``self/causal, forward at N = 1024 (SDPA 12.3 ms)``."""
    base = "" if h.baseline_time_s is None else f" (SDPA {ms_text(h.baseline_time_s, h.baseline_iqr_s)})"
    return f"{h.pattern}, {MODE_TITLES.get(h.mode, h.mode)} at N = {h.length}{base}"


def headline_verdict(h: Headline) -> str:
    """``4 of 41 methods faster than SDPA beyond the noise`` (and how many stopped at shorter lengths)."""
    text = f"{h.faster} of {h.measured} methods faster than SDPA beyond the noise"
    if h.shorter:
        text += (f"; {h.shorter} more measured only at shorter lengths (quadratic, over the time cap or failed: "
                 "see the cases without a result)")
    return text


def quality_note(a: Answers) -> str:
    """What the columns of the fastest-methods tables mean."""
    quality = f"accuracy of a tiny model trained with the method on {a.quality_task}" if a.quality_task else \
        "not measured in this run"
    return ("Ranked by median time at the longest length SDPA was measured at. vs SDPA: speed-up (≈: inside the "
            "noise, the IQR bands overlap); memory: peak memory / SDPA's; vs softmax: relative L2 difference of the "
            "output from softmax attention at default settings (exact: the method computes its own function "
            f"exactly; approx.: it approximates it); quality: {quality}.")


CONTENDER_HEADER = ["method", "family", "time", "vs SDPA", "memory × SDPA", "vs softmax (rel-L2)", "quality"]


def contender_cells(c: Contender) -> list[str]:
    return [c.method if c.backend in ("torch", "sdpa") else f"{c.method} ({c.backend})", c.family,
            ms_text(c.time_s, c.time_iqr_s), speedup_text(c), memory_text(c), error_text(c), accuracy_text(c)]


def crossover_table(items: list[Crossover], mode: str) -> tuple[list[str], list[list[str]]]:
    """Families × patterns for ``mode``: in each cell the best time crossover and memory crossover with the method."""
    patterns = [p for p in PATTERN_ORDER if any(c.pattern == p and c.mode == mode for c in items)]
    cells: dict[tuple[str, str], dict[str, Crossover]] = defaultdict(dict)
    for c in items:
        if c.mode == mode:
            cells[(c.family, c.pattern)][c.metric] = c
    families = list(dict.fromkeys(c.family for c in items if c.mode == mode))

    def cell(family: str, pattern: str) -> str:
        by = cells.get((family, pattern), {})
        return "; ".join(f"{metric} {crossover_text(c)} ({c.method})" for metric, c in sorted(by.items(),
                         key=lambda kv: kv[0] != "time")) or "—"

    return ["family", *patterns], [[f, *(cell(f, p) for p in patterns)] for f in families]


def missing_text(m: Missing, limit: int = 8) -> str:
    """``error · 3 cases · moba, pbs — reason``: one group on one line (at most ``limit`` methods named)."""
    names = ", ".join(m.methods[:limit]) + (f" and {len(m.methods) - limit} more" if len(m.methods) > limit else "")
    return f"{m.status} · {m.cases} case{'s' * (m.cases != 1)} ({', '.join(m.phases)}) · {names} — {m.reason or '?'}"


def no_crossover_note(mode: str) -> str:
    """Said where a mode has headlines but no efficiency length (one length measured)."""
    return f"No efficiency length for {MODE_TITLES.get(mode, mode)}: it needs two or more lengths measured."


def answers_markdown(a: Answers) -> list[str]:
    """The answers as Markdown lines (the head of ``summary.md``), in the page's order: per mode, the fastest methods
    per pattern and where each family starts to pay; then the cases without a result."""
    out: list[str] = []
    for mode in MODES:
        mine = [h for h in a.headlines if h.mode == mode]
        if mine:
            out += [f"## Fastest methods, {MODE_TITLES[mode]}, at the longest length measured", ""]
            out += [quality_note(a), ""] if mode == MODES[0] else []
            for h in mine:
                out += [f"**{headline_title(h)}**: {headline_verdict(h)}.", "",
                        md_table(CONTENDER_HEADER, [contender_cells(c) for c in h.fastest])]
        header, body = crossover_table(list(a.crossovers), mode)
        if body:
            out += [f"## Where each family starts to pay ({MODE_TITLES[mode]}): efficiency length against SDPA", "",
                    md_table(header, body)]
        elif mine:
            out += [no_crossover_note(mode), ""]
    if a.missing:
        out += ["## Cases without a result", ""] + [f"- {missing_text(m)}" for m in a.missing] + [""]
    return out
