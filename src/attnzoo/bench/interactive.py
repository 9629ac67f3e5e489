"""Interactive figures of a run for ``report.html``: Plotly charts that work offline in one file (the optional
``[interactive]`` extra; without ``plotly`` installed the page keeps only the static images of
:mod:`~attnzoo.bench.plots`).

- :func:`figures`: time and peak memory against N, one figure per mode (forward, forward+backward; a mode needs two
  measured lengths), drawn as small multiples by family (one panel per family on shared log-log axes, SDPA dashed
  black in every panel, as in the static plots). Every point's hover names method, backend, N, time (with its IQR),
  time / SDPA, peak memory and memory / SDPA; the legend lists the methods under their family (click one to hide it,
  its family's heading to hide the family); one row of buttons switches between the four patterns (every
  pattern's traces are in the figure, one pattern visible at a time: the headline pattern first), another between
  time and memory. A figure is a plain JSON-ready Plotly dict (``{"data": [...], "layout": {...}}``) built here,
  without the ``plotly`` package.
- :func:`plotly_script`: Plotly's JavaScript, taken from the installed ``plotly`` package, gzipped and
  base64-encoded into a ``<script>`` that unpacks it in the page (``DecompressionStream``) and runs it from a Blob
  URL; ``window.azPlotlyReady`` is a promise of ``window.Plotly`` (and the event ``az-plotly-ready`` fires on
  ``document``). Gzip shrinks plotly.min.js (4.8 MB) to about 1.5 MB, 2 MB in base64: the report stays under 5 MB.
- :func:`figures_html`: the fragment a page embeds: the script, one ``<figure class="az-figure">`` per figure and
  the script that draws them once Plotly is ready.
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

from attnzoo.bench.efficiency import BASELINE
from attnzoo.bench.series import (
    BASELINE_LABEL,
    Curve,
    baseline,
    by_family,
    curves,
    family_of,
    family_rank,
    headline_pattern,
    line_labels,
)
from attnzoo.bench.tables import PATTERN_ORDER, fmt, longest_rows

# D3's category10 (matplotlib's tab10): a method keeps its colour in every pattern; symbols tell the 11th line from
# the 1st
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
SYMBOLS = ("circle", "square", "triangle-up", "triangle-down", "diamond", "cross", "x", "pentagon", "hexagon", "star")
PANEL_PX = 300  # height of one row of panels
COLUMNS = 3
MEASURES = (  # (button label, row field, axis title, scale); the first is shown first
    ("time", "time_median_s", "time (ms)", 1e3),
    ("peak memory", "peak_bytes", "peak memory (MiB)", 1 / 2**20),
)
PLOT_CONFIG = {"responsive": True, "displaylogo": False}


@dataclass(frozen=True)
class Figure:
    """One interactive figure: ``id`` is its HTML id, ``spec`` the Plotly figure (``{"data", "layout"}``)."""

    id: str
    title: str
    caption: str
    spec: dict[str, Any]


def _hover(c: Curve, pattern: str, mode: str) -> str:
    """The hover template of a curve's points: what names the line, written once per trace; the measured numbers
    come from each point's ``customdata`` (:func:`_point_data`)."""
    name = html.escape(c.label if c.label == c.method else f"{c.label}: method {c.method}")
    return (f"<b>{name}</b> · backend {html.escape(c.backend)}<br>{c.family} · {pattern} · {mode} · N = %{{x}}"
            "<br>time %{customdata[0]} ms (IQR %{customdata[1]}) · %{customdata[2]}× SDPA"
            "<br>peak %{customdata[3]} MiB · %{customdata[4]}× SDPA<extra></extra>")


def _point_data(r: dict[str, Any]) -> list[str]:
    """One point's numbers for its hover: time (ms), its IQR, time / SDPA, peak memory (MiB), memory / SDPA."""
    return [fmt(r.get("time_median_s"), ".3g", 1e3), fmt(r.get("time_iqr_s"), ".2g", 1e3),
            fmt(r.get("time_ratio"), ".2f"), fmt(r.get("peak_bytes"), ".3g", 1 / 2**20),
            fmt(r.get("memory_ratio"), ".2f")]


def _axis_ref(k: int) -> str:
    """Plotly's name of panel ``k``'s axes in a trace (``x``, ``x2``, …); the layout's key is ``xaxis``+suffix."""
    return "" if k == 0 else str(k + 1)


def _values(c: Curve, field: str, scale: float) -> list[float | None]:
    """The curve's ``field`` at each length, scaled; ``None`` (a gap) where a row lacks it."""
    return [r[field] * scale if r.get(field) else None for r in c.rows]


def _trace(c: Curve, mode: str, pattern: str, panel: int, index: int, visible: bool) -> dict[str, Any]:
    """One curve in panel ``panel`` as a Plotly scatter trace of the first measure; SDPA bold, dashed and black, in
    the legend once."""
    ref = _axis_ref(panel)
    _, field, _, scale = MEASURES[0]
    trace = {
        "type": "scatter", "mode": "lines+markers", "name": c.label, "x": c.lengths, "y": _values(c, field, scale),
        "customdata": [_point_data(r) for r in c.rows], "hovertemplate": _hover(c, pattern, mode),
        "xaxis": f"x{ref}", "yaxis": f"y{ref}", "visible": visible, "meta": {"pattern": pattern},
    }
    if c.is_baseline:
        return {**trace, "legendgroup": BASELINE_LABEL, "showlegend": panel == 0, "legendrank": 1,
                "line": {"color": "black", "width": 3, "dash": "dash"}, "marker": {"size": 5, "color": "black"}}
    color = COLORS[index % len(COLORS)]
    return {**trace, "legendgroup": c.family, "legendgrouptitle": {"text": c.family},
            "legendrank": 10 + family_rank(c.family), "line": {"color": color, "width": 1.5},
            "marker": {"size": 6, "color": color, "symbol": SYMBOLS[(index // len(COLORS)) % len(SYMBOLS)]}}


def _layout(families: list[str], lengths: list[int], ytitle: str) -> dict[str, Any]:
    """A grid of panels, ``COLUMNS`` wide, one per family, on shared log-log axes, a title over each."""
    cols = min(COLUMNS, len(families))
    rows = math.ceil(len(families) / cols)
    plot_px = rows * PANEL_PX
    gap_x, gap_y = 0.05, 70 / plot_px
    layout: dict[str, Any] = {
        "height": plot_px + 170, "margin": {"t": 120, "b": 60, "l": 70, "r": 20}, "hovermode": "closest",
        "legend": {"groupclick": "toggleitem", "font": {"size": 10}, "tracegroupgap": 8},
        "annotations": [], "plot_bgcolor": "white",
    }
    for k, family in enumerate(families):
        row, col = divmod(k, cols)
        x0, x1 = col / cols + gap_x / 2, (col + 1) / cols - gap_x / 2
        y1 = 1 - row / rows - (gap_y / 2 if row else 0)
        y0 = 1 - (row + 1) / rows + gap_y / 2
        ref = _axis_ref(k)
        layout[f"xaxis{ref}"] = {
            "type": "log", "domain": [x0, x1], "anchor": f"y{ref}", "tickvals": lengths,
            "ticktext": [str(n) for n in lengths], "gridcolor": "#e5e5e5", "linecolor": "#444",
            **({"matches": "x"} if k else {}),
            **({"title": {"text": "sequence length N"}} if k >= len(families) - cols else {}),
        }
        layout[f"yaxis{ref}"] = {
            "type": "log", "domain": [y0, y1], "anchor": f"x{ref}", "gridcolor": "#e5e5e5", "linecolor": "#444",
            "exponentformat": "none", **({"matches": "y"} if k else {}),
            **({"title": {"text": ytitle}} if col == 0 else {}),
        }
        layout["annotations"].append({"text": f"<b>{family}</b>", "xref": "paper", "yref": "paper", "x": x0,
                                      "y": y1, "xanchor": "left", "yanchor": "bottom", "showarrow": False})
    return layout


def _menus(patterns: list[str], shown: str, owner: list[str], drawn: list[Curve], families: int,
           height: int) -> list[dict[str, Any]]:
    """Two rows of buttons over the panels: the pattern (left; sets which traces are visible) and the measure
    (right; sets every trace's ``y`` and the y titles). Each menu changes what the other leaves alone, so they
    combine."""
    y = 1 + 45 / (height - 180)  # in the top margin, under the title
    pattern_menu = {
        "type": "buttons", "direction": "right", "showactive": True, "active": patterns.index(shown),
        "x": 0, "xanchor": "left", "y": y, "yanchor": "bottom",
        "buttons": [{"label": p, "method": "restyle", "args": [{"visible": [o == p for o in owner]}]}
                    for p in patterns],
    }
    left_axes = [f"yaxis{_axis_ref(k)}" for k in range(0, families, min(COLUMNS, families))]
    measure_menu = {
        "type": "buttons", "direction": "right", "showactive": True, "active": 0,
        "x": 1, "xanchor": "right", "y": y, "yanchor": "bottom",
        "buttons": [{"label": label, "method": "update",
                     "args": [{"y": [_values(c, field, scale) for c in drawn]},
                              {**{f"{a}.title.text": title for a in left_axes}, "yaxis.autorange": True}]}
                    for label, field, title, scale in MEASURES],
    }
    return [pattern_menu, measure_menu]


def _mode_figure(results: dict[str, Any], mode: str) -> Figure | None:
    """Time and peak memory against N at one mode: a panel per family, every pattern's traces, one pattern visible
    (the headline one), buttons to switch pattern and measure; ``None`` unless some curve has two lengths."""
    field = MEASURES[0][1]
    found = {p: curves(results, mode, p, field) for p in PATTERN_ORDER}
    shown = headline_pattern(results, mode, field)
    families = sorted({c.family for cs in found.values() for c in cs if not c.is_baseline}, key=family_rank)
    if shown is None or not families:
        return None
    patterns = [p for p in PATTERN_ORDER if found[p]]
    data: list[dict[str, Any]] = []
    drawn: list[Curve] = []  # the curve of each trace
    owner: list[str] = []  # the pattern of each trace
    for p in patterns:
        groups = by_family(found[p])
        base = baseline(found[p])
        for k, family in enumerate(families):
            mine = [*groups.get(family, []), *([base] if base else [])]
            for i, c in enumerate(mine):
                data.append(_trace(c, mode, p, k, i, p == shown))
                drawn.append(c)
                owner.append(p)
    title = f"time and peak memory vs sequence length N, {mode}"
    lengths = sorted({n for cs in found.values() for c in cs for n in c.lengths})
    layout = _layout(families, lengths, MEASURES[0][2])
    layout["title"] = {"text": title, "x": 0.01, "xanchor": "left", "y": 1, "yref": "container", "yanchor": "top",
                       "pad": {"t": 12}}
    layout["updatemenus"] = _menus(patterns, shown, owner, drawn, len(families), layout["height"])
    caption = (f"Time and peak memory against N ({mode}), one panel per family on the same log-log axes, SDPA "
               f"dashed black in each; {shown} first (the pattern with the most methods). Hover a point for its "
               "method, backend, time and memory and their ratios to SDPA; click a legend entry to hide a method, a "
               "family's heading to hide the family; the buttons switch pattern and measure.")
    return Figure(f"az-fig-{mode.replace('+', '')}", title, caption, {"data": data, "layout": layout})


def _ratio_trace(family: str, rows: list[dict[str, Any]], labels: dict[tuple[str, str], str], mode: str,
                 pattern: str, visible: bool) -> dict[str, Any]:
    """One family's methods at one mode and pattern as points (time / SDPA, memory / SDPA)."""
    color = COLORS[family_rank(family) % len(COLORS)]
    return {
        "type": "scatter", "mode": "markers", "name": family, "legendgroup": family,
        "x": [r["time_ratio"] for r in rows], "y": [r["memory_ratio"] for r in rows],
        "customdata": [[labels[(r["method"], r["backend"])], r["backend"], r["length"],
                        fmt(r.get("time_median_s"), ".3g", 1e3), fmt(r.get("peak_bytes"), ".3g", 1 / 2**20)]
                       for r in rows],
        "hovertemplate": ("<b>%{customdata[0]}</b> · backend %{customdata[1]}"
                          f"<br>{family} · {pattern} · {mode} · N = %{{customdata[2]}}"
                          "<br>time %{customdata[3]} ms · %{x:.2f}× SDPA"
                          "<br>peak %{customdata[4]} MiB · %{y:.2f}× SDPA<extra></extra>"),
        "marker": {"size": 9, "color": color, "symbol": SYMBOLS[family_rank(family) % len(SYMBOLS)],
                   "line": {"width": 0.5, "color": "white"}},
        "visible": visible, "meta": {"pattern": pattern, "mode": mode},
    }


def _ratio_figure(results: dict[str, Any]) -> Figure | None:
    """Every method's time and memory relative to SDPA at the longest length measured, one point per method,
    coloured by family (a legend entry per family toggles it); a menu picks the mode and pattern. SDPA sits at
    (1×, 1×): the lower left quadrant is faster and leaner. Needs a single length only."""
    combos: list[tuple[str, str, list[dict[str, Any]]]] = []
    for mode in ("fwd", "fwd+bwd"):
        rows = [r for r in longest_rows(results.get("efficiency", []), mode) if r.get("time_ratio")
                and r.get("memory_ratio") and (r["method"], r["backend"]) != BASELINE]
        combos += [(mode, p, [r for r in rows if r["pattern"] == p]) for p in PATTERN_ORDER
                   if any(r["pattern"] == p for r in rows)]
    if not combos:
        return None
    first = headline_pattern(results, "fwd", MEASURES[0][1])
    shown = next((i for i, (m, p, _) in enumerate(combos) if (m, p) == ("fwd", first)), 0)
    labels = line_labels((r["method"], r["backend"]) for _, _, rows in combos for r in rows)
    data: list[dict[str, Any]] = []
    owner: list[int] = []  # the combination of each trace
    for i, (mode, pattern, rows) in enumerate(combos):
        for family in sorted({family_of(r["method"]) for r in rows}, key=family_rank):
            data.append(_ratio_trace(family, [r for r in rows if family_of(r["method"]) == family], labels, mode,
                                     pattern, i == shown))
            owner.append(i)
    powers = [2.0**k for k in range(-10, 11)]
    axis = {"type": "log", "tickvals": powers, "ticktext": [f"{v:g}×" for v in powers], "gridcolor": "#e5e5e5",
            "linecolor": "#444", "zeroline": False}
    title = "time and peak memory relative to SDPA at the longest measured length"
    layout = {
        "height": 560, "margin": {"t": 110, "b": 60, "l": 70, "r": 20}, "hovermode": "closest",
        "plot_bgcolor": "white", "legend": {"font": {"size": 11}},
        "title": {"text": title, "x": 0.01, "xanchor": "left", "y": 1, "yref": "container", "yanchor": "top",
                  "pad": {"t": 12}},
        "xaxis": {**axis, "title": {"text": "time / SDPA time (log; left is faster)"}},
        "yaxis": {**axis, "title": {"text": "peak memory / SDPA's (log; lower is leaner)"}},
        "shapes": [{"type": "line", "xref": "x", "yref": "paper", "x0": 1, "x1": 1, "y0": 0, "y1": 1,
                    "line": {"color": "black", "width": 2, "dash": "dash"}},
                   {"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": 1, "y1": 1,
                    "line": {"color": "black", "width": 2, "dash": "dash"}}],
        "annotations": [{"text": "SDPA", "x": 0, "y": 0, "xref": "x", "yref": "y", "showarrow": True,
                         "arrowhead": 0, "ax": 25, "ay": -20, "font": {"size": 11}},
                        {"text": "faster and leaner", "xref": "paper", "yref": "paper", "x": 0.01, "y": 0.01,
                         "xanchor": "left", "yanchor": "bottom", "showarrow": False,
                         "font": {"color": "#2ca02c"}}],
        "updatemenus": [{
            "type": "dropdown", "active": shown, "x": 0, "xanchor": "left", "y": 1 + 45 / 390, "yanchor": "bottom",
            "buttons": [{"label": f"{mode} · {pattern} · N = {max(r['length'] for r in rows)}", "method": "restyle",
                         "args": [{"visible": [o == i for o in owner]}]}
                        for i, (mode, pattern, rows) in enumerate(combos)],
        }],
    }
    caption = ("Each method's time (x) and peak memory (y) relative to SDPA at the longest length measured, one "
               "point per method, coloured by family; SDPA at 1×, 1× (dashed lines). Hover a point for its method, "
               "backend and measurements; click a family in the legend to hide it; the menu picks mode and pattern.")
    return Figure("az-fig-ratios", title, caption, {"data": data, "layout": layout})


def figures(results: dict[str, Any]) -> list[Figure]:
    """Every interactive figure there is data for: one per mode (forward, forward+backward) measured at two
    lengths or more, then the map of every method's time and memory relative to SDPA."""
    made = [_mode_figure(results, mode) for mode in ("fwd", "fwd+bwd")] + [_ratio_figure(results)]
    return [f for f in made if f is not None]


def _plotly_js() -> bytes | None:
    """The installed ``plotly`` package's minified Plotly.js; ``None`` without the package (or its data file)."""
    try:
        import plotly  # noqa: F401  (only its data file is used)

        return resources.files("plotly").joinpath("package_data", "plotly.min.js").read_bytes()
    except (ImportError, FileNotFoundError):
        return None


# Unpacks the inlined gzip (a data: URL, decoded natively: a few times faster than atob), runs it as a script and
# resolves window.azPlotlyReady with window.Plotly; a page that embeds the fragment twice loads Plotly once.
_LOADER = """<script>
window.azPlotlyReady = window.azPlotlyReady || (async () => {
  const packed = await fetch("data:application/gzip;base64,%s");
  const code = await new Response(packed.body.pipeThrough(new DecompressionStream("gzip"))).blob();
  const url = URL.createObjectURL(new Blob([code], {type: "text/javascript"}));
  await new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = url;
    s.onload = resolve;
    s.onerror = () => reject(new Error("the inlined Plotly.js did not load"));
    document.head.appendChild(s);
  });
  URL.revokeObjectURL(url);
  document.dispatchEvent(new Event("az-plotly-ready"));
  return window.Plotly;
})();
</script>"""


@functools.cache
def plotly_script() -> str | None:
    """A ``<script>`` that makes ``window.Plotly`` available offline (see the module's doc); ``None`` without the
    ``plotly`` package. Encoded once per process."""
    js = _plotly_js()
    if js is None:
        return None
    packed = gzip.compress(js, compresslevel=9, mtime=0)
    return _LOADER % base64.b64encode(packed).decode("ascii")


# Draws every figure once Plotly is ready; a figure that fails says why in place of its plot.
_RENDER = """<script>
(() => {
  const specs = JSON.parse(document.getElementById("az-figure-specs").textContent);
  const config = %s;
  window.azPlotlyReady.then(Plotly => Promise.all(Object.entries(specs).map(([id, spec]) =>
    Plotly.newPlot(document.querySelector("#" + id + " .az-plot"), spec.data, spec.layout, config))))
  .catch(err => {
    for (const el of document.querySelectorAll(".az-figure .az-plot:empty"))
      el.textContent = "interactive figure unavailable (" + err + "); the static images show the same data";
    console.warn(err);
  });
})();
</script>"""


def _json_in_script(value: Any) -> str:
    """``value`` as JSON that is safe inside a ``<script>`` element (no ``</script>`` can occur in it)."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c")


def figures_html(results: dict[str, Any]) -> str | None:
    """The HTML fragment of the interactive figures (Plotly inlined, the figures, their drawing script); ``None``
    without ``plotly`` or without a figure to draw."""
    script = plotly_script()
    made = figures(results)
    if script is None or not made:
        return None
    blocks = [script]
    for f in made:
        blocks.append(f'<figure class="az-figure" id="{f.id}"><div class="az-plot"></div>'
                      f"<figcaption><b>{html.escape(f.title)}</b>. {html.escape(f.caption)}</figcaption></figure>")
    blocks.append(f'<script type="application/json" id="az-figure-specs">'
                  f"{_json_in_script({f.id: f.spec for f in made})}</script>")
    blocks.append(_RENDER % json.dumps(PLOT_CONFIG))
    return "\n".join(blocks)
