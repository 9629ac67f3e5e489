"""Results file (versioned schema), Markdown summary, PNG plots and a self-contained HTML report.

``results.json`` (schema ``attnzoo.bench/1``)::

    {"schema": "attnzoo.bench/1", "status": "complete" | "interrupted" | "running", "created", "finished", "wall_s",
     "command", "machine": {...}, "config": {...}, "memory_method": "...",
     "efficiency": [row, ...], "efficiency_length": [entry, ...], "approximation": [row, ...], "quality": [row, ...]}

Every row keeps its case (method, backend, pattern, mode, length, shapes, device, dtype) and ``status`` (``ok``,
``unsupported``, ``error``, ``oom``, ``timeout``, ``crashed``, ``skipped``) with a ``reason``. A reader accepts any
``attnzoo.bench/1.x`` file; a later major version is refused with a clear error.

Plots use matplotlib's Agg backend; without matplotlib (the ``[report]`` extra) the JSON, Markdown and an HTML page
without pictures are still written.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attnzoo.bench.efficiency import BASELINE, attach_ratios, fill_flops
from attnzoo.bench.fit import efficiency_length
from attnzoo.errors import fail

SCHEMA = "attnzoo.bench/1"
SCHEMA_MAJOR = 1
SECTIONS = ("efficiency", "efficiency_length", "approximation", "quality")
PATTERN_ORDER = ("self/noncausal", "self/causal", "cross/noncausal", "cross/causal")


# ------------------------------------------------------------------------------------------------------------- schema
def _finite(x: Any) -> Any:
    """``x`` with NaN and infinities replaced by None, so that the file is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` atomically (a temporary file renamed over ``path``) as strict JSON."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(results), indent=1, default=str, allow_nan=False))
    tmp.replace(path)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results file, checking its schema."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise fail("results", "an existing results.json file", str(path)) from None
    except json.JSONDecodeError as e:
        raise fail("results", "a JSON file written by attnzoo bench", f"{path}: {e}") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith("attnzoo.bench/"):
        raise fail("results", f"a results file with schema {SCHEMA!r}", f"{path} with schema {schema!r}")
    major = schema.split("/", 1)[1].split(".")[0]
    if major != str(SCHEMA_MAJOR):
        raise fail("results", f"schema version {SCHEMA_MAJOR}.x (this attnzoo reads {SCHEMA!r})", schema)
    for section in SECTIONS:
        if not isinstance(data.get(section, []), list):
            raise fail("results", f"a list under {section!r}", type(data[section]).__name__)
        data.setdefault(section, [])
    return data


# ------------------------------------------------------------------------------------------------------------- analysis
def fit_efficiency_lengths(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CAB efficiency lengths (time and memory) per method, backend, pattern, mode, device and dtype."""
    curves: dict[tuple, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if r.get("status") == "ok":
            curves[(r["method"], r["backend"], r["pattern"], r["mode"], r["device"], r["dtype"])][r["length"]] = r
    out = []
    for (method, backend, pattern, mode, device, dtype), points in curves.items():
        base = curves.get((*BASELINE, pattern, mode, device, dtype))
        if (method, backend) == BASELINE or not base:
            continue
        for metric, field in (("time", "time_median_s"), ("memory", "peak_bytes")):
            mine = [(n, r[field]) for n, r in sorted(points.items()) if r.get(field)]
            theirs = [(n, r[field]) for n, r in sorted(base.items()) if r.get(field)]
            if len(mine) < 2 or len(theirs) < 2:
                continue
            e = efficiency_length([n for n, _ in mine], [c for _, c in mine], [n for n, _ in theirs],
                                  [c for _, c in theirs])
            out.append({"method": method, "backend": backend, "pattern": pattern, "mode": mode, "device": device,
                        "dtype": dtype, "metric": metric, **e.to_json()})
    return out


def _eff_cell(entries: dict[tuple, dict[str, Any]], key: tuple, metric: str) -> str:
    e = entries.get((*key, metric))
    if e is None:
        return "—"
    n = e.get("length")
    short = (f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}") if n is not None else ""
    if e["kind"] == "crossing":
        return ("~" if e.get("extrapolated") else "") + short
    if e["kind"] == "until":
        return f"until {short}"
    return str(e["kind"]) if e["kind"] != "unknown" else "—"


def _fmt(x: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x * scale, spec)


def longest_rows(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Per method, backend and pattern, its measured row at the longest length (a run cut short by its time budget
    may have measured some methods at fewer lengths than others)."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["mode"] != mode or r.get("status") != "ok":
            continue
        key = (r["method"], r["backend"], r["pattern"])
        if key not in best or r["length"] > best[key]["length"]:
            best[key] = r
    return sorted(best.values(), key=lambda r: (PATTERN_ORDER.index(r["pattern"]), (r["method"], r["backend"]) !=
                                               BASELINE, r.get("time_ratio") or 1e9, r["method"]))


def efficiency_table(results: dict[str, Any], mode: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the efficiency table for ``mode``, each series at its longest measured length."""
    rows = longest_rows(results["efficiency"], mode)
    entries = {(e["method"], e["backend"], e["pattern"], e["mode"], e["metric"]): e
               for e in results.get("efficiency_length", [])}
    header = ["method", "backend", "pattern", "N", "ms", "± IQR", "× SDPA", "peak MiB", "mem × SDPA", "GFLOP/s",
              "time ∝ N^", "eff. length (time)", "eff. length (mem)"]
    base_exp = {e["pattern"]: e.get("baseline_exponent") for e in results.get("efficiency_length", [])
                if e["metric"] == "time" and e["mode"] == mode}
    body = []
    for r in rows:
        key = (r["method"], r["backend"], r["pattern"], mode)
        is_base = (r["method"], r["backend"]) == BASELINE
        exp = base_exp.get(r["pattern"]) if is_base else (entries.get((*key, "time")) or {}).get("exponent")
        body.append([
            r["method"], r["backend"], r["pattern"], str(r["length"]), _fmt(r["time_median_s"], ".3g", 1e3),
            _fmt(r.get("time_iqr_s"), ".2g", 1e3), _fmt(r.get("time_ratio"), ".2f"),
            _fmt(r.get("peak_bytes"), ".3g", 1 / 2**20), _fmt(r.get("memory_ratio"), ".2f"),
            _fmt(r.get("gflops_per_s"), ".3g"), _fmt(exp, ".2f"),
            "baseline" if is_base else _eff_cell(entries, key, "time"),
            "baseline" if is_base else _eff_cell(entries, key, "memory"),
        ])
    return header, body


def failures_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Every case that did not produce a measurement, grouped by what failed and why (lengths joined)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for section in ("efficiency", "approximation", "quality"):
        for r in results.get(section, []):
            if r.get("status") == "ok":
                continue
            where = r.get("pattern") or (r.get("task") or {}).get("name", "")
            what = f"{r.get('backend', '')} {r.get('mode', '')}".strip() if section == "efficiency" else section
            groups[(r["method"], what, where, r["status"], r.get("reason", ""))].append(
                str(r.get("length", "")) if section == "efficiency" else "")
    header = ["method", "case", "pattern/task", "status", "lengths", "reason"]
    body = [[m, w, p, s, ",".join(x for x in ls if x), reason] for (m, w, p, s, reason), ls in sorted(groups.items())]
    return header, body


def approximation_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "kind", "pattern", "setting", "rel. L2 vs softmax", "mass recall", "density"]
    body = []
    rows = [r for r in results.get("approximation", []) if r.get("status") == "ok"]
    order = {name: i for i, name in enumerate(dict.fromkeys(r["method"] for r in rows))}
    rows.sort(key=lambda r: (order[r["method"]], PATTERN_ORDER.index(r["pattern"]), bool(r.get("setting"))))
    for r in rows:
        setting = ", ".join(f"{k}={v}" for k, v in (r.get("setting") or {}).items()) or "defaults"
        kind = "exact" if r.get("exact") else "approx"
        body.append([r["method"], kind, r["pattern"], setting, _fmt(r.get("rel_l2"), ".3g"),
                     _fmt(r.get("mass_recall"), ".3f"), _fmt(r.get("density"), ".3f")])
    return header, body


def _task_label(task: dict[str, Any]) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in task.items() if k != "name")
    return f"{task['name']} ({extra})" if extra else task["name"]


def quality_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["task", "width", "method", "accuracy", "chance", "final loss", "train s"]
    ok = [r for r in results.get("quality", []) if r.get("status") == "ok"]
    ok.sort(key=lambda r: (_task_label(r["task"]), r["dim"], -r["accuracy"]))
    body = [[_task_label(r["task"]), str(r["dim"]), r["method"], f"{r['accuracy']:.3f}", f"{r['chance']:.3f}",
             _fmt(r.get("final_loss"), ".3f"), _fmt(r.get("train_time_s"), ".1f")] for r in ok]
    return header, body


# ---------------------------------------------------------------------------------------------------------- markdown
def _md_table(header: list[str], body: list[list[str]]) -> str:
    if not body:
        return "_nothing measured_\n"
    esc = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in body]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines) + "\n"


def overview(results: dict[str, Any]) -> list[str]:
    m, c = results.get("machine", {}), results.get("config", {})
    counts: dict[str, int] = defaultdict(int)
    for r in results.get("efficiency", []):
        counts[r.get("status", "?")] += 1
    return [
        f"status: **{results.get('status')}**, wall time {_fmt(results.get('wall_s'), '.0f')} s, "
        f"command `{results.get('command', '')}`",
        f"machine: {m.get('device_name', '?')} ({m.get('cpu_count', '?')} CPUs, {m.get('threads', '?')} torch "
        "threads), "
        f"{m.get('platform', '')}, python {m.get('python', '')}, torch {m.get('torch', '')}, attnzoo "
        f"{m.get('attnzoo', '')}",
        f"shapes: batch {c.get('batch')}, heads {c.get('heads')} (kv {c.get('kv_heads') or c.get('heads')}), "
        f"head_dim {c.get('head_dim')}, dtype {c.get('dtype')}, device {c.get('device')}; "
        "self: seq_q = seq_kv = N; cross: seq_q = N/2, seq_kv = N",
        f"timing: median over up to {c.get('repeats')} repeats after {c.get('warmup')} warm-up call(s)"
        f"{' (synchronised)' if str(c.get('device', '')).startswith('cuda') else ''}; peak memory: "
        f"{results.get('memory_method', '')}",
        "efficiency cases: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
    ]


def summary_markdown(results: dict[str, Any], images: Iterable[str] = ()) -> str:
    out = ["# attnzoo bench", ""]
    out += [f"- {line}" for line in overview(results)] + [""]
    for mode in ("fwd", "fwd+bwd"):
        header, body = efficiency_table(results, mode)
        if body:
            out += [f"## Efficiency, {mode} (each at its longest measured N)", "", _md_table(header, body)]
    header, body = approximation_table(results)
    if body:
        out += ["## Output difference from softmax attention (approximation error for approximate methods)", "",
                _md_table(header, body)]
    header, body = quality_table(results)
    if body:
        out += ["## Quality on synthetic tasks", "", _md_table(header, body)]
    header, body = failures_table(results)
    if body:
        out += ["## Cases without a measurement", "", _md_table(header, body)]
    images = list(images)
    if images:
        out += ["## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
    out += ["Column meanings: see docs/bench.md.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------- plots
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


def _mqar_plot(results: dict[str, Any], path: Path, plt: Any) -> bool:
    """MQAR accuracy against the number of key-value pairs, one line per method, one panel per model width."""
    rows = [r for r in results.get("quality", []) if r.get("status") == "ok" and r["task"]["name"] == "mqar"]
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
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle("MQAR: recall accuracy vs number of key-value pairs (black: softmax)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
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
    for r in results.get("quality", []):
        if r.get("status") == "ok":
            label = f"{_task_label(r['task'])}, width {r['dim']}"
            quality[label].append((r["method"], r["accuracy"]))
            chance[label] = r["chance"]
    if _bars_plot(quality, "accuracy", "quality on synthetic tasks (equal budgets)", out / "quality.png", plt,
                  marks=chance):
        made.append("quality.png")
    if _mqar_plot(results, out / "mqar.png", plt):
        made.append("mqar.png")
    approx: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for r in results.get("approximation", []):
        if r.get("status") == "ok" and not r.get("setting") and r.get("rel_l2"):
            approx[r["pattern"]].append((r["method"], r["rel_l2"]))
    if _bars_plot(approx, "relative L2 difference from softmax (log)", "output vs softmax attention, default settings",
                  out / "approximation.png", plt, log=True):
        made.append("approximation.png")
    return made


# ----------------------------------------------------------------------------------------------------------------- html
def _html_table(header: list[str], body: list[list[str]]) -> str:
    if not body:
        return "<p><em>nothing measured</em></p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f0f0f0;position:sticky;top:0}img{max-width:100%;border:1px solid #eee;margin:1em 0}
code{background:#f4f4f4;padding:1px 4px}li{margin:.2em 0}"""


def report_html(results: dict[str, Any], out: Path, images: list[str]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>attnzoo bench</title>",
             f"<style>{CSS}</style></head><body><h1>attnzoo bench</h1><ul>"]
    parts += [f"<li>{html.escape(line)}</li>" for line in overview(results)]
    parts.append("</ul>")
    for name in images:
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(Path(name).stem)}</h3><img alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{data}'>")
    for mode in ("fwd", "fwd+bwd"):
        header, body = efficiency_table(results, mode)
        if body:
            parts.append(f"<h2>Efficiency, {mode} (each at its longest measured N)</h2>" + _html_table(header, body))
    for title, (header, body) in (
        ("Output difference from softmax attention", approximation_table(results)),
        ("Quality on synthetic tasks", quality_table(results)),
        ("Cases without a measurement", failures_table(results)),
    ):
        if body:
            parts.append(f"<h2>{title}</h2>" + _html_table(header, body))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """Complete ``results`` (FLOPs filled in, ratios to SDPA, efficiency lengths) and write results.json,
    summary.md, the plots and report.html under ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    fill_flops(results["efficiency"])
    attach_ratios(results["efficiency"])
    results["efficiency_length"] = fit_efficiency_lengths(results["efficiency"])
    save_results(out / "results.json", results)
    images = write_plots(results, out)
    (out / "summary.md").write_text(summary_markdown(results, images))
    (out / "report.html").write_text(report_html(results, out, images))
    return [out / "results.json", out / "summary.md", out / "report.html", *(out / i for i in images)]
