"""PNG plots of a run (matplotlib's Agg backend), drawn to stay readable with a hundred methods: the static images of
``report.html`` (the fallback of :mod:`~attnzoo.bench.interactive`) and of ``summary.md``. Without matplotlib (the
``[report]`` extra) no plot is written and the rest of the report is.

Every figure groups the methods by family (:mod:`~attnzoo.bench.series`) and shows SDPA in each group:

- ``time_{mode}.png``, ``memory_{mode}.png`` (mode ``fwd`` or ``fwdbwd``): time and peak memory against N, log-log,
  as *small multiples*: one panel per family, every panel on the same axes, SDPA a bold dashed black line in each,
  each line named at its right end instead of a legend (names pushed apart where they would overlap:
  :func:`spread_labels`). They show the headline pattern (:func:`~attnzoo.bench.series.headline_pattern`, the one
  with the most methods, named in the title) and need two measured lengths; the ratio chart covers every pattern.
- ``ratio_{mode}.png``: time / SDPA time at the longest measured length: one row per method, rows grouped by family
  and sorted within it (fastest first), one column per pattern, each bar drawn from the 1× line (green: faster).
- ``approximation.png``: relative L2 difference from softmax attention at default settings, same layout.
- ``quality.png``: accuracy on each synthetic task, same layout, one column per task and model width; chance dotted,
  softmax dashed.
- ``mqar.png``: MQAR accuracy against the number of key-value pairs, small multiples by family with softmax in each
  panel (when several pair counts ran).
- ``presses.png``: KV-cache presses against cache budget (a handful of lines: a legend still reads).

Sizes stay small (report.html embeds them): 100 dpi, flat colours, saved with a palette (:func:`save_png`).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnzoo.bench.efficiency import BASELINE
from attnzoo.bench.series import (
    baseline,
    by_family,
    curves,
    family_of,
    family_rank,
    headline_pattern,
    line_labels,
)
from attnzoo.bench.tables import PATTERN_ORDER, longest_rows, quality_points, task_label

DPI = 100
COLORS = 128  # of a saved PNG's palette
LABEL_PT = 6.5  # font size of the line names at the right end of a panel
LABEL_GAP = 1.25  # the least distance between two line names, in multiples of LABEL_PT
PANEL_W = 3.0  # inches of one small-multiple panel
LABEL_W = 1.45  # inches to its right for the line names
ROW_H = 0.155  # inches per bar row
MARKERS = "os^vD<>ph*"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class Line:
    """One line of a panel: its name (drawn at its right end) and its points."""

    label: str
    xs: list[float]
    ys: list[float]


def spread_labels(ys: Sequence[float], gap: float, lo: float = -math.inf, hi: float = math.inf) -> list[float]:
    """Positions for labels wanted at heights ``ys``, at least ``gap`` apart, each as near its wish as that allows.

    The labels are placed bottom-up; a label that would overlap the group below joins it, and the merged group is
    centred on the mean of its members' wishes (which may push it into the group below: merge again). The groups
    are then kept within ``[lo, hi]`` where they fit (a stack taller than the range overflows at the bottom).
    Returns the positions in the order of ``ys``.
    """
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    groups: list[tuple[float, list[int]]] = []  # (lowest position, members bottom-up)
    for i in order:
        groups.append((ys[i], [i]))
        while len(groups) > 1 and groups[-2][0] + len(groups[-2][1]) * gap > groups[-1][0]:
            _, top = groups.pop()
            _, below = groups.pop()
            members = below + top
            mean = sum(ys[j] for j in members) / len(members)
            groups.append((mean - (len(members) - 1) * gap / 2, members))
    placed = [(start + k * gap, j) for start, members in groups for k, j in enumerate(members)]
    pos = [p for p, _ in placed]
    for k in range(len(pos)):  # up from the floor, then down from the ceiling
        pos[k] = max(pos[k], lo if k == 0 else pos[k - 1] + gap)
    for k in reversed(range(len(pos))):
        pos[k] = min(pos[k], hi if k == len(pos) - 1 else pos[k + 1] - gap)
    out = [0.0] * len(ys)
    for p, (_, j) in zip(pos, placed, strict=True):
        out[j] = p
    return out


def _label_ends(ax: Any, ends: list[tuple[Line, Any, bool]], log: bool) -> None:
    """Name each line at the right of ``ax``, level with its last point where the names do not collide, with a thin
    leader from the point to its name. The axes' limits and position must be final."""
    height_pt = ax.get_position().height * ax.figure.get_figheight() * 72
    to, back = (math.log10, lambda v: 10**v) if log else (float, float)
    lo, hi = (to(v) for v in ax.get_ylim())
    gap = LABEL_PT * LABEL_GAP / height_pt * (hi - lo)
    spots = spread_labels([to(line.ys[-1]) for line, _, _ in ends], gap, lo + gap / 2, hi - gap / 2)
    for (line, color, bold), spot in zip(ends, spots, strict=True):
        ax.annotate(line.label, xy=(line.xs[-1], line.ys[-1]), xytext=(1.03, back(spot)),
                    textcoords=("axes fraction", "data"), fontsize=LABEL_PT, color=color, va="center",
                    fontweight="bold" if bold else "normal", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6, "shrinkA": 0,
                                "shrinkB": 1})


def _extent(values: list[float], log: bool, pad: float) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    return (lo / pad, hi * pad) if log else (lo - (hi - lo) * (pad - 1), hi + (hi - lo) * (pad - 1))


def small_multiples(groups: dict[str, list[Line]], references: list[Line], *, xlabel: str, ylabel: str, title: str,
                    plt: Any, ylim: tuple[float, float] | None = None) -> Any:
    """One panel per group (family), in a grid of up to three columns, all on the same axes (log in x; log in y
    unless ``ylim`` fixes a linear range); the ``references`` (SDPA) drawn bold, dashed and black in every panel;
    every line named at its right end. Returns the figure, or ``None`` without a group to draw."""
    groups = {name: lines for name, lines in groups.items() if lines}
    if not groups:
        return None
    ylog = ylim is None
    n = len(groups)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    most = max(len(lines) for lines in groups.values()) + len(references)
    panel_h = max(2.3, most * LABEL_PT * LABEL_GAP / 72 + 0.4)
    left, bottom, top, vgap = 0.75, 0.5, 0.75, 0.6
    width = left + cols * (PANEL_W + LABEL_W)
    height = bottom + top + nrows * panel_h + (nrows - 1) * vgap
    fig, axes = plt.subplots(nrows, cols, figsize=(width, height), sharex=True, sharey=True, squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - LABEL_W / width, bottom=bottom / height, top=1 - top / height,
                        wspace=LABEL_W / PANEL_W, hspace=vgap / panel_h)
    everything = [line for lines in groups.values() for line in lines] + references
    xs = sorted({x for line in everything for x in line.xs})
    axes[0][0].set_xscale("log", base=2)
    axes[0][0].set_xlim(*_extent(xs, True, 1.12))
    axes[0][0].set_xticks(xs, [f"{x:g}" for x in xs], minor=False)
    axes[0][0].xaxis.set_minor_locator(plt.NullLocator())
    if ylog:
        axes[0][0].set_yscale("log")
        axes[0][0].set_ylim(*_extent([y for line in everything for y in line.ys], True, 1.25))
    else:
        axes[0][0].set_ylim(*ylim)
    cmap = plt.get_cmap("tab10")
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            above = axes.flat[k - cols]
            above.xaxis.set_tick_params(labelbottom=True)  # the last panel of a column shows its ticks
    for k, (ax, (name, lines)) in enumerate(zip(axes.flat, groups.items(), strict=False)):
        ends = []
        for i, line in enumerate(lines):
            color = cmap(i % 10)
            ax.plot(line.xs, line.ys, color=color, marker=MARKERS[(i // 10) % len(MARKERS)], markersize=3,
                    linewidth=1.1)
            ends.append((line, color, False))
        for ref in references:
            ax.plot(ref.xs, ref.ys, color="black", linewidth=2.4, linestyle="--", zorder=3)
            ends.append((ref, "black", True))
        _label_ends(ax, ends, ylog)
        ax.set_title(f"{name} ({len(lines)})", fontsize=9, loc="left")
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=7)
        if k % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        if k >= n - cols:
            ax.set_xlabel(xlabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _efficiency_lines(results: dict[str, Any], mode: str, pattern: str, field: str,
                      scale: float) -> tuple[dict[str, list[Line]], list[Line]]:
    """The curves at ``pattern`` and ``mode`` as lines by family, and SDPA's as the reference."""
    found = curves(results, mode, pattern, field)
    groups = {fam: [Line(c.label, c.lengths, c.values(field, scale)) for c in cs]
              for fam, cs in by_family(found).items()}
    base = baseline(found)
    return groups, [Line(base.label, base.lengths, base.values(field, scale))] if base else []


def efficiency_figure(results: dict[str, Any], mode: str, field: str, ylabel: str, scale: float, plt: Any) -> Any:
    """Time or memory (``field``) against N at the headline pattern, small multiples by family; ``None`` when no
    pattern has a method measured at two lengths."""
    pattern = headline_pattern(results, mode, field)
    if pattern is None:
        return None
    groups, refs = _efficiency_lines(results, mode, pattern, field, scale)
    title = (f"{ylabel} vs sequence length N, {mode}, {pattern} (the pattern with the most methods), log-log; "
             "one panel per family; dashed black: SDPA")
    return small_multiples(groups, refs, xlabel="sequence length N", ylabel=ylabel, title=title, plt=plt)


def family_bars(columns: dict[str, dict[str, float]], families: dict[str, str], *, xlabel: str, title: str, plt: Any,
                log: bool = False, ref: float | None = None, marks: dict[str, list[tuple[float, str]]] | None = None,
                notes: dict[str, dict[str, str]] | None = None,
                value_text: Callable[[float], str] | None = None) -> Any:
    """Horizontal bars, one row per label, rows grouped under a bold heading per family (catalogue order) and sorted
    within it by the mean of their values (of their logs when ``log``) across the columns; one column per key of
    ``columns``, all sharing the rows and the x axis. With ``ref`` each bar is drawn from the ``ref`` line, green
    below it and red above (ratios: ``ref`` = 1); otherwise from the axis' start, in blue. ``marks`` add dotted
    vertical lines per column (``(x, "chance")``, grey; the label ``softmax`` dashed black); ``value_text``
    writes each value at its bar's end, followed by the row's note from ``notes`` (``@512``). A row without a value
    in a column is left blank there. Returns the figure, or ``None`` without a value."""
    columns = {name: values for name, values in columns.items() if values}
    if not columns:
        return None
    to = math.log if log else float
    members: dict[str, list[str]] = defaultdict(list)
    for label in dict.fromkeys(label for values in columns.values() for label in values):
        members[families[label]].append(label)

    def mean(label: str) -> float:
        xs = [to(values[label]) for values in columns.values() if label in values]
        return sum(xs) / len(xs)

    rows: list[tuple[str, bool]] = []  # (text, is a family heading)
    for fam in sorted(members, key=family_rank):
        rows.append((f"{fam} ({len(members[fam])})", True))
        rows.extend((label, False) for label in sorted(members[fam], key=mean))
    every = [v for values in columns.values() for v in values.values()] + ([ref] if ref else [])
    pad = 3.0 if value_text else 1.3  # room for the value written past a bar's end
    lo, hi = _extent(every, log, pad) if log else (0.0, max(every) * (1.15 if value_text else 1.05))
    width, height = 1.9 + 2.7 * len(columns), 1.2 + ROW_H * len(rows)
    fig, axes = plt.subplots(1, len(columns), figsize=(width, height), sharey=True, sharex=True, squeeze=False)
    fig.subplots_adjust(left=1.75 / width, right=1 - 0.15 / width, bottom=0.45 / height, top=1 - 0.75 / height,
                        wspace=0.08)
    for ax, (name, values) in zip(axes.flat, columns.items(), strict=True):
        ys = [i for i, (text, heading) in enumerate(rows) if not heading and text in values]
        vs = [values[rows[i][0]] for i in ys]
        base = ref if ref is not None else lo
        colors = ["tab:blue" if ref is None else "tab:green" if v < ref else "tab:red" for v in vs]
        ax.barh(ys, [v - base for v in vs], left=base, height=0.72, color=colors)
        for i, (_, heading) in enumerate(rows):
            if heading:
                ax.axhspan(i - 0.5, i + 0.5, color="0.88", zorder=0)
        if ref is not None:
            ax.axvline(ref, color="black", linewidth=1)
        for x, label in (marks or {}).get(name, []):
            ax.axvline(x, color="black" if label == "softmax" else "grey",
                       linestyle="--" if label == "softmax" else ":", linewidth=1)
        for i, v in zip(ys, vs, strict=True):
            text = " ".join(t for t in (value_text(v) if value_text else "", (notes or {}).get(name, {}).get(
                rows[i][0], "")) if t)
            if text:
                left = ref is not None and v < ref
                ax.text(v, i, f" {text} ", fontsize=5.5, va="center", color="0.25",
                        ha="right" if left else "left")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="x", which="major", alpha=0.3)
    first = axes[0][0]
    if log:
        first.set_xscale("log")
    first.set_xlim(lo, hi)
    first.set_ylim(len(rows) - 0.5, -0.5)
    first.set_yticks(range(len(rows)), [text for text, _ in rows], fontsize=6.5)
    for tick, (_, heading) in zip(first.get_yticklabels(), rows, strict=True):
        if heading:
            tick.set_fontweight("bold")
    if ref == 1.0:
        _ratio_ticks(first, lo, hi)
    fig.suptitle(title, fontsize=10, y=1 - 0.2 / height, va="top")
    return fig


def _ratio_ticks(ax: Any, lo: float, hi: float) -> None:
    """``4×``- and ``1/4×``-style labels at powers of two on a log ratio axis (every other power where many)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = [2.0**e for e in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
    step = max(1, len(ticks) // 6)
    ax.xaxis.set_major_locator(FixedLocator([t for t in ticks if round(math.log2(t)) % step == 0]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×" if x >= 1 else f"1/{1 / x:g}×"))
    ax.xaxis.set_minor_locator(NullLocator())


def ratio_figure(results: dict[str, Any], mode: str, plt: Any) -> Any:
    """Time / SDPA time at each pattern's longest measured length, grouped by family; a row measured at a
    shorter length says so (``@512``)."""
    rows = [r for r in longest_rows(results.get("efficiency", []), mode)
            if r.get("time_ratio") and (r["method"], r["backend"]) != BASELINE]
    labels = line_labels((r["method"], r["backend"]) for r in rows)
    columns: dict[str, dict[str, float]] = {}
    notes: dict[str, dict[str, str]] = {}
    for pattern in PATTERN_ORDER:
        mine = [r for r in rows if r["pattern"] == pattern]
        if not mine:
            continue
        longest = max(r["length"] for r in mine)
        name = f"{pattern}, N = {longest}"
        columns[name] = {labels[(r["method"], r["backend"])]: r["time_ratio"] for r in mine}
        notes[name] = {labels[(r["method"], r["backend"])]: f"@{r['length']}" for r in mine if r["length"] < longest}
    families = {labels[(r["method"], r["backend"])]: family_of(r["method"]) for r in rows}
    return family_bars(columns, families, xlabel="time / SDPA time (log; < 1× is faster)", plt=plt, log=True,
                       ref=1.0, notes=notes, value_text=lambda v: f"{v:.2g}×",
                       title=f"time relative to SDPA at the longest measured length, {mode} (green: faster; "
                             "blank: not measured at that pattern)")


def approximation_figure(results: dict[str, Any], plt: Any) -> Any:
    """Relative L2 difference from softmax attention at default settings, one column per pattern."""
    ok = [r for r in results.get("approximation", []) if r.get("status") == "ok" and not r.get("setting")
          and r.get("rel_l2")]
    labels = line_labels((r["method"], r.get("backend", "")) for r in ok)
    columns: dict[str, dict[str, float]] = {p: {} for p in PATTERN_ORDER}
    for r in ok:
        columns[r["pattern"]][labels[(r["method"], r.get("backend", ""))]] = r["rel_l2"]
    families = {labels[(r["method"], r.get("backend", ""))]: family_of(r["method"]) for r in ok}
    return family_bars(columns, families, xlabel="relative L2 difference from softmax (log)", plt=plt, log=True,
                       value_text=lambda v: f"{v:.1g}",
                       title="output vs softmax attention, default settings (blank: not measured at that pattern)")


def quality_figure(results: dict[str, Any], plt: Any) -> Any:
    """Accuracy per method on each synthetic task and width, with chance and softmax's accuracy marked."""
    columns: dict[str, dict[str, float]] = defaultdict(dict)
    marks: dict[str, list[tuple[float, str]]] = {}
    for r in quality_points(results):
        name = f"{task_label(r['task'])}, width {r['dim']}"
        columns[name][r["method"]] = r["accuracy"]
        marks.setdefault(name, [(r["chance"], "chance")])
    for name, values in columns.items():
        if BASELINE[0] in values:
            marks[name].append((values[BASELINE[0]], "softmax"))
    families = {m: family_of(m) for values in columns.values() for m in values}
    return family_bars(dict(columns), families, xlabel="accuracy (dotted: chance; dashed: softmax)", plt=plt,
                       marks=marks,
                       value_text=lambda v: f"{v:.2f}",
                       title="quality on synthetic tasks (equal budgets)")


def mqar_figure(results: dict[str, Any], plt: Any) -> Any:
    """MQAR accuracy against the number of key-value pairs, small multiples by family, softmax in every panel (a
    line per model width where several ran)."""
    rows = [r for r in quality_points(results) if r["task"]["name"] == "mqar"]
    if len({r["task"].get("pairs") for r in rows}) < 2:
        return None
    widths = sorted({r["dim"] for r in rows})
    by: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        by[(r["method"], r["dim"])].append((r["task"]["pairs"], r["accuracy"]))
    groups: dict[str, list[Line]] = defaultdict(list)
    references = []
    for (method, dim), pts in by.items():
        pts.sort()
        line = Line(method if len(widths) == 1 else f"{method} w{dim}", [p for p, _ in pts], [a for _, a in pts])
        if method == BASELINE[0]:
            references.append(line)
        else:
            groups[family_of(method)].append(line)
    ordered = {fam: groups[fam] for fam in sorted(groups, key=family_rank)}
    return small_multiples(ordered, references, xlabel="key-value pairs", ylabel="accuracy", plt=plt,
                           ylim=(0.0, 1.05), title="MQAR: recall accuracy vs number of key-value pairs; one panel "
                                                   "per family; dashed black: softmax")


def press_figure(results: dict[str, Any], plt: Any) -> Any:
    """Retrieval accuracy (left) and one layer's relative L2 error (right, budgets below 100 %) against the cache
    budget, one line per press; the full cache's accuracy in black (the ceiling), chance dotted."""
    rows = [r for r in results.get("presses", []) if r.get("status") == "ok"]
    presses = list(dict.fromkeys(r["press"] for r in rows if r["press"] != "full cache"))
    if not presses:
        return None
    chance = 1 / results.get("config", {}).get("task", {}).get("values", math.inf)
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (test, metric, label) in zip(axes, (("retrieval", "accuracy", "retrieval accuracy"),
                                                ("layer_error", "rel_l2", "relative L2 error vs full cache (log)")),
                                         strict=True):
        for i, press in enumerate(presses):
            pts = sorted((r["budget"] * 100, r[metric]) for r in rows if r["press"] == press and r["test"] == test
                         and (test == "retrieval" or r["budget"] < 1))  # the error at 100 % is 0: off a log axis
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=press, color=cmap(i % 10),
                        marker=MARKERS[(i // 10) % len(MARKERS)], markersize=4, linewidth=1.2)
        budgets = sorted({r["budget"] * 100 for r in rows if r["test"] == test and (test == "retrieval"
                                                                                   or r["budget"] < 1)})
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:g} %" for b in budgets])
        ax.set_xlabel("cache budget (tokens, or bytes for presses that shrink each token)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if test == "retrieval":
            full = [r["accuracy"] for r in rows if r["press"] == "full cache" and r["test"] == test]
            if full:
                ax.axhline(full[0], color="black", linewidth=2.2, label="full cache")
            ax.axhline(chance, color="grey", linestyle=":", label="chance")
            ax.set_ylim(0, 1.02)
        elif any(r["test"] == test for r in rows):
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle("KV-cache presses: quality against cache budget")
    fig.tight_layout()
    return fig


def figures(results: dict[str, Any], plt: Any) -> list[tuple[str, Callable[[], Any]]]:
    """Every plot's file name and the function that draws it (returning ``None`` when there is no data for it)."""
    made: list[tuple[str, Callable[[], Any]]] = []
    for mode in ("fwd", "fwd+bwd"):
        tag = mode.replace("+", "")
        made += [
            (f"time_{tag}.png", lambda m=mode: efficiency_figure(results, m, "time_median_s", "time (ms)", 1e3, plt)),
            (f"memory_{tag}.png", lambda m=mode: efficiency_figure(results, m, "peak_bytes", "peak memory (MiB)",
                                                                   1 / 2**20, plt)),
            (f"ratio_{tag}.png", lambda m=mode: ratio_figure(results, m, plt)),
        ]
    return made + [
        ("quality.png", lambda: quality_figure(results, plt)),
        ("mqar.png", lambda: mqar_figure(results, plt)),
        ("presses.png", lambda: press_figure(results, plt)),
        ("approximation.png", lambda: approximation_figure(results, plt)),
    ]


def save_png(fig: Any, path: Path) -> None:
    """``fig`` as a PNG of at most :data:`COLORS` colours (flat-coloured charts lose nothing visible; the file is
    about a quarter of matplotlib's full-colour one, which report.html embeds)."""
    from PIL import Image  # matplotlib's own dependency

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, bbox_inches="tight")
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(COLORS, dither=Image.Dither.NONE).save(path, optimize=True)


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """Write every plot there is data for under ``out``; return their file names (empty without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    made = []
    for name, draw in figures(results, plt):
        fig = draw()
        if fig is not None:
            save_png(fig, out / name)
            plt.close(fig)
            made.append(name)
    return made
