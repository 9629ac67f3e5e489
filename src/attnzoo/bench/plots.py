"""PNG plots of a run (matplotlib's Agg backend): time and memory against length, ratios to SDPA, quality, MQAR,
difference from softmax, KV-cache presses against cache budget. Without matplotlib (the ``[report]`` extra) no plot
is written and the rest of the report is.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from attnzoo.bench.efficiency import BASELINE
from attnzoo.bench.tables import PATTERN_ORDER, longest_rows, quality_points, task_label


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(i: int, n: int, plt: Any) -> dict[str, Any]:
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return {"color": cmap(i % cmap.N), "marker": "os^vDP*Xh<>"[i % 11],
            "linestyle": ["-", "--", ":", "-."][(i // 11) % 4], "markersize": 4, "linewidth": 1.2}


def _curve_plot(
    results: dict[str, Any], mode: str, field: str, ylabel: str, scale: float, path: Path, plt: Any
) -> bool:
    rows = [r for r in results["efficiency"] if r["mode"] == mode and r.get("status") == "ok" and r.get(field)]
    patterns = [p for p in PATTERN_ORDER if any(r["pattern"] == p for r in rows)]
    if not patterns or len({r["length"] for r in rows}) < 2:
        return False
    lines = sorted({(r["method"], r["backend"]) for r in rows}, key=lambda mb: (mb != BASELINE, mb))
    cols = min(2, len(patterns))
    nrows = math.ceil(len(patterns) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.5 * nrows), squeeze=False)
    handles = {}
    for ax, pattern in zip(axes.flat, patterns, strict=False):
        for i, (method, backend) in enumerate(lines):
            pts = sorted((r["length"], r[field] * scale) for r in rows
                         if (r["method"], r["backend"], r["pattern"]) == (method, backend, pattern))
            if not pts:
                continue
            style = _style(i, len(lines), plt)
            if (method, backend) == BASELINE:
                style.update(color="black", linewidth=2.6, marker="o", linestyle="-")
            (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{method} ({backend})", **style)
            handles[f"{method} ({backend})"] = h
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(pattern)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(patterns):]:
        ax.axis("off")
    fig.suptitle(f"{ylabel} vs length, {mode} (log-log; black: SDPA baseline)")
    ncol = 1 if len(handles) <= 20 else 2
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               ncol=ncol, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _ratio_plot(results: dict[str, Any], mode: str, path: Path, plt: Any) -> bool:
    rows = [r for r in longest_rows(results["efficiency"], mode)
            if r.get("time_ratio") and (r["method"], r["backend"]) != BASELINE]
    patterns = [p for p in PATTERN_ORDER if any(r["pattern"] == p for r in rows)]
    if not patterns:
        return False
    longest = {p: max(r["length"] for r in rows if r["pattern"] == p) for p in patterns}
    height = max(2.5, 0.22 * max(sum(r["pattern"] == p for r in rows) for p in patterns) + 1.2)
    fig, axes = plt.subplots(1, len(patterns), figsize=(4.6 * len(patterns), height), squeeze=False)
    for ax, pattern in zip(axes.flat, patterns, strict=True):
        mine = sorted((r for r in rows if r["pattern"] == pattern), key=lambda r: r["time_ratio"], reverse=True)
        labels = [f"{r['method']} ({r['backend']})" + (f" @{r['length']}" if r["length"] != longest[pattern] else "")
                  for r in mine]
        ratios = [r["time_ratio"] for r in mine]
        colors = ["tab:green" if x < 1 else "tab:red" for x in ratios]
        ax.barh(range(len(mine)), ratios, color=colors)
        ax.set_yticks(range(len(mine)), labels, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=1)
        _log_ratio_axis(ax, ratios)
        ax.set_title(f"{pattern}, N = {longest[pattern]}", fontsize=9)
        ax.set_xlabel("time / SDPA time (log; <1 is faster)")
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.suptitle(f"time relative to SDPA at the longest measured length, {mode}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _log_ratio_axis(ax: Any, ratios: list[float]) -> None:
    """A log axis spanning the ratios and 1, with plain ``0.5×``-style labels at powers of two."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = min([*ratios, 1.0]) / 1.3, max([*ratios, 1.0]) * 1.3
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks = [2.0**e for e in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
    ax.xaxis.set_minor_locator(NullLocator())


def _bars_plot(groups: dict[str, list[tuple[str, float]]], xlabel: str, title: str, path: Path, plt: Any,
               log: bool = False, marks: dict[str, float] | None = None) -> bool:
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return False
    height = max(2.5, 0.22 * max(len(v) for v in groups.values()) + 1.2)
    cols = min(4, len(groups))
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.8 * cols, height * nrows), squeeze=False)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    for ax, (name, items) in zip(axes.flat, groups.items(), strict=False):
        items = sorted(items, key=lambda x: x[1])
        ax.barh(range(len(items)), [v for _, v in items], color="tab:blue")
        ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=7)
        if marks and name in marks:
            ax.axvline(marks[name], color="gray", linestyle=":", label="chance")
            ax.legend(fontsize=7, loc="lower right")
        if log:
            ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _save_with_legend(fig: Any, ax: Any, title: str, path: Path, plt: Any) -> None:
    """Title ``fig``, put ``ax``'s legend to its right, save it to ``path`` and close it."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _mqar_plot(results: dict[str, Any], path: Path, plt: Any) -> bool:
    """MQAR accuracy against the number of key-value pairs, one line per method, one panel per model width."""
    rows = [r for r in quality_points(results) if r["task"]["name"] == "mqar"]
    widths = sorted({r["dim"] for r in rows})
    if len({r["task"].get("pairs") for r in rows}) < 2:
        return False
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 4.2), squeeze=False)
    for ax, width in zip(axes.flat, widths, strict=True):
        for i, method in enumerate(methods):
            pts = sorted((r["task"]["pairs"], r["accuracy"]) for r in rows
                         if r["method"] == method and r["dim"] == width)
            if pts:
                style = _style(i, len(methods), plt)
                if method == BASELINE[0]:
                    style.update(color="black", linewidth=2.6, linestyle="-")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **style)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"width {width}")
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy")
        ax.grid(True, alpha=0.3)
    _save_with_legend(fig, axes.flat[0], "MQAR: recall accuracy vs number of key-value pairs (black: softmax)", path,
                      plt)
    return True


def _press_plot(results: dict[str, Any], path: Path, plt: Any) -> bool:
    """Retrieval accuracy (left) and one layer's relative L2 error (right, budgets below 100 %) against the cache
    budget, one line per press; the full cache's accuracy in black (the ceiling), chance dotted."""
    rows = [r for r in results.get("presses", []) if r.get("status") == "ok"]
    presses = list(dict.fromkeys(r["press"] for r in rows if r["press"] != "full cache"))
    if not presses:
        return False
    chance = 1 / results.get("config", {}).get("task", {}).get("values", math.inf)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (test, metric, label) in zip(axes, (("retrieval", "accuracy", "retrieval accuracy"),
                                                ("layer_error", "rel_l2", "relative L2 error vs full cache (log)")),
                                         strict=True):
        for i, press in enumerate(presses):
            pts = sorted((r["budget"] * 100, r[metric]) for r in rows if r["press"] == press and r["test"] == test
                         and (test == "retrieval" or r["budget"] < 1))  # the error at 100 % is 0: off a log axis
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=press, **_style(i, len(presses), plt))
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
    _save_with_legend(fig, axes[0], "KV-cache presses: quality against cache budget", path, plt)
    return True


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """Write every plot there is data for; return their file names (empty without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    made = []
    for mode in ("fwd", "fwd+bwd"):
        tag = mode.replace("+", "")
        if _curve_plot(results, mode, "time_median_s", "time (ms)", 1e3, out / f"time_{tag}.png", plt):
            made.append(f"time_{tag}.png")
        if _curve_plot(results, mode, "peak_bytes", "peak memory (MiB)", 1 / 2**20, out / f"memory_{tag}.png", plt):
            made.append(f"memory_{tag}.png")
        if _ratio_plot(results, mode, out / f"ratio_{tag}.png", plt):
            made.append(f"ratio_{tag}.png")
    quality: dict[str, list[tuple[str, float]]] = defaultdict(list)
    chance: dict[str, float] = {}
    for r in quality_points(results):
        label = f"{task_label(r['task'])}, width {r['dim']}"
        quality[label].append((r["method"], r["accuracy"]))
        chance[label] = r["chance"]
    if _bars_plot(quality, "accuracy", "quality on synthetic tasks (equal budgets)", out / "quality.png", plt,
                  marks=chance):
        made.append("quality.png")
    if _mqar_plot(results, out / "mqar.png", plt):
        made.append("mqar.png")
    if _press_plot(results, out / "presses.png", plt):
        made.append("presses.png")
    approx: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for r in results.get("approximation", []):
        if r.get("status") == "ok" and not r.get("setting") and r.get("rel_l2"):
            approx[r["pattern"]].append((r["method"], r["rel_l2"]))
    if _bars_plot(approx, "relative L2 difference from softmax (log)", "output vs softmax attention, default settings",
                  out / "approximation.png", plt, log=True):
        made.append("approximation.png")
    return made

