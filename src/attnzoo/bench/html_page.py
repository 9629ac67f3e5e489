"""``report.html``: one self-contained page that works offline (inline CSS and vanilla JavaScript, no CDN).

Layout, top to bottom: the run's facts (status badge, command, machine; the rest behind "run details"); the answers
(:mod:`attnzoo.bench.answers`: the fastest methods per pattern, where each family starts to pay, what did not run);
the plots (interactive figures when given, else the PNGs); then every table (:func:`attnzoo.bench.tables.sections`).

Tables are sortable and filterable. Each row carries ``data-family``, ``data-pattern``, ``data-mode``,
``data-backend`` and ``data-kind`` (exact/approximate) where its columns say them; each numeric cell carries
``data-value`` (the number behind the rounded text). Clicking a header sorts by that column, numerically on
``data-value`` where the cells have one (cells without a value, ``—``, go last either way). The filter bar above the
tables hides the rows whose attribute differs from the chosen value (rows without that attribute stay) and those not
containing the search text. Column meanings (:data:`attnzoo.bench.tables.COLUMN_HELP`) are the headers' ``title``.

:func:`page` and :func:`table_html` are shared with ``--compare``'s page (:mod:`attnzoo.bench.compare`).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attnzoo.bench.answers import (
    CONTENDER_HEADER,
    MODE_TITLES,
    MODES,
    Answers,
    Crossover,
    Headline,
    Missing,
    answers,
    contender_cells,
    crossover_text,
    family_order,
    headline_verdict,
    method_info,
    ms_text,
    no_crossover_note,
    quality_note,
)
from attnzoo.bench.tables import COLUMN_HELP, PATTERN_ORDER, Section, run_facts, sections

FILTERS = ("family", "pattern", "mode", "backend", "kind", "change")  # change: --compare's page
# One colour per family (catalogue order), for the tags beside method names.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
CAPTIONS = {
    "time_fwd": "Forward time against sequence length, log-log; SDPA in black.",
    "time_fwdbwd": "Forward + backward time against sequence length, log-log; SDPA in black.",
    "memory_fwd": "Forward peak memory against sequence length.",
    "memory_fwdbwd": "Forward + backward peak memory against sequence length.",
    "ratio_fwd": "Forward time / SDPA's time at the longest length measured (green: faster).",
    "ratio_fwdbwd": "Forward + backward time / SDPA's time at the longest length measured (green: faster).",
    "approximation": "Relative L2 difference from softmax attention, default settings.",
    "quality": "Accuracy per method on each synthetic task, chance as a line.",
    "mqar": "MQAR accuracy against the number of key-value pairs.",
    "presses": "KV-cache presses: accuracy and layer error against cache budget.",
}

CSS = """
:root{--fg:#1d2330;--muted:#5d6778;--line:#dde2ea;--bg2:#f5f7fa;--good:#1a7f37;--bad:#c62828;--accent:#2f5fb3}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1440px;padding:12px 24px;
color:var(--fg)}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid var(--line);
padding-bottom:4px}h3{font-size:15px;margin:0 0 2px}#answers h3{margin-top:16px}
code{background:var(--bg2);padding:1px 5px;border-radius:3px;font-size:13px}
.az-badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:600;color:#fff;
vertical-align:middle;background:var(--muted)}
.az-badge.complete,.az-badge.ok{background:var(--good)}.az-badge.interrupted,.az-badge.error,.az-badge.crashed,
.az-badge.timeout,.az-badge.oom{background:var(--bad)}.az-badge.unsupported{background:#8a6d00}
.az-badge.skipped,.az-badge.unchanged{background:#77808f}.az-badge.faster{background:var(--good)}
.az-badge.slower{background:var(--bad)}tr[data-change=faster]{background:#eef8f0}tr[data-change=slower]{background:#fdeeee}
.az-meta{color:var(--muted);margin:2px 0}.az-meta span+span:before{content:" · "}
details.az-run dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:6px 0}
details.az-run dt{color:var(--muted)}details.az-run dd{margin:0}
nav.az-nav{margin:8px 0;font-size:13px}nav.az-nav a{margin-right:12px;color:var(--accent);text-decoration:none}
.az-note{color:var(--muted);font-size:12.5px;margin:2px 0 8px}
.az-cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(640px,1fr));gap:12px}
.az-card{border:1px solid var(--line);border-radius:8px;padding:8px 12px 2px;background:#fff}
.az-card .az-sub{color:var(--muted);font-size:12.5px;font-weight:normal;margin-left:6px}
.az-card table{width:100%;margin:0 0 6px}.az-card td,.az-card th{padding:3px 5px}
.az-card th,.az-card td:nth-child(5){white-space:normal}
.az-tag{display:inline-block;width:9px;height:9px;border-radius:2px;margin-right:5px;vertical-align:baseline}
table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid var(--line);padding:3px 8px;text-align:left;white-space:nowrap}
td.az-wrap{white-space:normal;min-width:260px}
th{background:var(--bg2);font-weight:600}
td[data-value],td.az-n,th.az-num{text-align:right;font-variant-numeric:tabular-nums}
.az-good{color:var(--good);font-weight:600}.az-bad{color:var(--bad)}.az-dim{color:var(--muted)}
.az-x .az-measured{font-weight:600;color:var(--good)}.az-x .az-extra{color:var(--muted);font-style:italic}
.az-x td{white-space:normal;vertical-align:top}.az-x td:first-child{white-space:nowrap}
.az-x .az-who{color:var(--muted);font-size:12px}
ul.az-missing{padding-left:0;list-style:none;margin:4px 0}ul.az-missing li{margin:3px 0}
ul.az-missing .az-why{color:var(--muted)}.az-more{text-decoration:underline dotted;cursor:help}
.az-filters{position:sticky;top:0;z-index:3;background:#fff;border-bottom:1px solid var(--line);padding:6px 0;
display:flex;flex-wrap:wrap;gap:10px;align-items:center;font-size:13px}
.az-filters select,.az-filters input{font:inherit;padding:2px 4px}
.az-scroll{max-height:75vh;overflow:auto;border:1px solid var(--line);border-radius:6px}
.az-scroll thead th{position:sticky;top:0;z-index:1}
table.az-table th{cursor:pointer;user-select:none}table.az-table th:hover{background:#e8edf5}
th[title]>span{text-decoration:underline dotted #8893a5}
th[aria-sort=ascending]:after{content:" ▲";font-size:10px}th[aria-sort=descending]:after{content:" ▼";font-size:10px}
tr[hidden]{display:none}.az-count{color:var(--muted);font-size:12px;font-weight:normal;margin-left:8px}
.az-plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:12px}
figure.az-figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:8px;background:#fff}
figure.az-figure img{max-width:100%;display:block;margin:0 auto}
figure.az-figure figcaption{color:var(--muted);font-size:12.5px;margin-top:4px}
"""

JS = """
(function () {
  "use strict";
  function key(td) {
    var text = td ? td.textContent.trim() : "";
    var raw = td ? td.getAttribute("data-value") : null;
    var num = raw === null ? NaN : parseFloat(raw);
    return {empty: text === "" || text === "—", num: num, text: text};
  }
  function compare(a, b) {
    var an = !isNaN(a.num), bn = !isNaN(b.num);
    if (an && bn) return a.num === b.num ? 0 : (a.num < b.num ? -1 : 1);
    if (an !== bn) return an ? -1 : 1;
    return a.text.localeCompare(b.text, undefined, {numeric: true, sensitivity: "base"});
  }
  function sortBy(th) {
    var table = th.closest("table"), col = th.cellIndex;
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.map.call(body.rows, function (tr, i) { return {tr: tr, i: i, k: key(tr.cells[col])}; });
    rows.sort(function (a, b) {
      if (a.k.empty !== b.k.empty) return a.k.empty ? 1 : -1;
      return dir * compare(a.k, b.k) || a.i - b.i;
    });
    rows.forEach(function (r) { body.appendChild(r.tr); });
  }
  function applyFilters() {
    var chosen = {};
    document.querySelectorAll("[data-filter]").forEach(function (el) {
      if (el.value) chosen[el.getAttribute("data-filter")] = el.value;
    });
    var search = document.getElementById("az-search");
    var q = search ? search.value.trim().toLowerCase() : "";
    document.querySelectorAll("table.az-table").forEach(function (table) {
      var rows = table.tBodies[0].rows, shown = 0;
      for (var i = 0; i < rows.length; i++) {
        var tr = rows[i], ok = true;
        for (var name in chosen) {
          var v = tr.getAttribute("data-" + name);
          if (v !== null && v !== chosen[name]) { ok = false; break; }
        }
        if (ok && q && tr.textContent.toLowerCase().indexOf(q) < 0) ok = false;
        tr.hidden = !ok;
        if (ok) shown++;
      }
      var count = document.getElementById(table.id + "-count");
      if (count) count.textContent = (shown === rows.length ? "" : shown + " of ") + rows.length + " rows";
    });
  }
  document.querySelectorAll("table.az-table thead th").forEach(function (th) {
    th.tabIndex = 0;
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (e) { if (e.key === "Enter") sortBy(th); });
  });
  document.querySelectorAll("[data-filter],#az-search").forEach(function (el) {
    el.addEventListener("input", applyFilters);
    el.addEventListener("change", applyFilters);
  });
  applyFilters();
})();
"""

esc = html.escape


def page(title: str, body: Iterable[str]) -> str:
    """A complete HTML document: ``body`` parts after the inline style, the inline script at the end."""
    return "\n".join([f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
                      "<meta name='viewport' content='width=device-width,initial-scale=1'>",
                      f"<style>{CSS}</style></head><body>", *body, f"<script>{JS}</script></body></html>"])


def badge(status: str) -> str:
    return f"<span class='az-badge {esc(status)}'>{esc(status)}</span>"


def family_tag(family: str) -> str:
    """A small square in the family's colour, its name as the tooltip."""
    order = family_order()
    colour = PALETTE[order.index(family) % len(PALETTE)] if family in order else PALETTE[-1]
    return f"<span class='az-tag' style='background:{colour}' title='{esc(family)}'></span>"


def header_html(results: dict[str, Any], title: str = "attnzoo bench") -> str:
    """Title with the status badge, the command and machine on one line, every fact behind "run details"."""
    facts = dict(run_facts(results))
    status = facts.pop("status", "?")
    m = results.get("machine", {})
    machine = f"{m.get('device_name', '?')}, {m.get('cpu_count', '?')} CPUs, {m.get('threads', '?')} torch thread(s)"
    line = [f"<code>{esc(facts.get('command', ''))}</code>", esc(facts.get("wall time", "")), esc(machine),
            f"torch {esc(str(m.get('torch', '')))}"]
    details = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts.items())
    return (f"<header><h1>{esc(title)} {badge(status)}</h1><p class='az-meta'>"
            + "".join(f"<span>{x}</span>" for x in line if x)
            + f"</p><details class='az-run'><summary>run details</summary><dl>{details}</dl></details></header>")


def _mini_table(h: Headline) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in CONTENDER_HEADER if c != "family")
    rows = []
    for c in h.fastest:
        method, _family, time, speed, *rest = contender_cells(c)  # the family is the tag's colour here
        tone = "az-good" if c.faster else ("az-bad" if c.clear else "az-dim")
        rows.append(f"<tr data-method='{esc(c.method)}'><td>{family_tag(c.family)}{esc(method)}</td>"
                    f"<td>{esc(time)}</td><td class='{tone}'>{esc(speed)}</td>"
                    + "".join(f"<td>{esc(x)}</td>" for x in rest) + "</tr>")
    if not rows:
        rows.append(f"<tr><td colspan='{len(CONTENDER_HEADER) - 1}' class='az-dim'>no method measured</td></tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _pattern_cards(items: list[Headline]) -> str:
    """One card per pattern: the headline length, SDPA's time, how many methods beat it, the fastest methods."""
    cards = []
    for h in sorted(items, key=lambda h: PATTERN_ORDER.index(h.pattern)):
        base = "" if h.baseline_time_s is None else f" · SDPA {ms_text(h.baseline_time_s, h.baseline_iqr_s)}"
        cards.append(f"<div class='az-card' data-pattern='{esc(h.pattern)}'><h3>{esc(h.pattern)} "
                     f"<span class='az-sub'>N = {h.length}{esc(base)} · {esc(headline_verdict(h))}</span></h3>"
                     f"{_mini_table(h)}</div>")
    return f"<div class='az-cards'>{''.join(cards)}</div>"


def _crossover_cell(c: Crossover | None, metric: str) -> str:
    if c is None:
        return ""
    measured = c.kind == "always" or (c.kind == "crossing" and not c.extrapolated)
    cls = "az-measured" if measured else "az-extra"
    return (f"<div>{metric} <span class='{cls}'>{esc(crossover_text(c))}</span> "
            f"<span class='az-who'>{esc(c.method)}</span></div>")


def _crossover_html(items: list[Crossover], mode: str) -> str:
    mine = [c for c in items if c.mode == mode]
    if not mine:
        return ""
    patterns = [p for p in PATTERN_ORDER if any(c.pattern == p for c in mine)]
    by = {(c.family, c.pattern, c.metric): c for c in mine}
    families = list(dict.fromkeys(c.family for c in mine))
    head = "<th>family</th>" + "".join(f"<th>{esc(p)}</th>" for p in patterns)
    rows = "".join(
        f"<tr data-family='{esc(f)}'><td>{family_tag(f)}{esc(f)}</td>"
        + "".join(f"<td>{_crossover_cell(by.get((f, p, 'time')), 'time')}"
                  f"{_crossover_cell(by.get((f, p, 'memory')), 'memory')}</td>" for p in patterns) + "</tr>"
        for f in families)
    return (f"<h3>Where each family starts to pay ({esc(MODE_TITLES.get(mode, mode))})</h3>"
            "<p class='az-note'>Efficiency length against SDPA (CAB): the sequence length beyond which the family's "
            "best method is cheaper, in time and in peak memory. <b>Measured</b> crossings lie between lengths that "
            "were run; <i>extrapolated</i> ones come from the fitted power laws beyond the longest length run.</p>"
            f"<table class='az-x'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")


def _missing_html(items: list[Missing]) -> str:
    if not items:
        return ""
    lines = []
    for m in items:
        more = (f" <span class='az-more' title='{esc(', '.join(m.methods[6:]))}'>and {len(m.methods) - 6} more</span>"
                if len(m.methods) > 6 else "")
        cases = f"{m.cases} case{'s' * (m.cases != 1)}"
        lines.append(f"<li>{badge(m.status)} <b>{cases}</b> ({esc(', '.join(m.phases))}): "
                     f"{esc(', '.join(m.methods[:6]))}{more} — <span class='az-why'>{esc(m.reason or '?')}</span></li>")
    total = sum(m.cases for m in items)
    return (f"<h3>Cases without a result ({total}, in {len(items)} groups)</h3>"
            f"<ul class='az-missing'>{''.join(lines)}</ul>")


def answers_html(a: Answers) -> str:
    """The answers section (empty when the run measured nothing to answer from, e.g. a named suite)."""
    if not (a.headlines or a.crossovers or a.missing):
        return ""
    parts = ["<section id='answers'><h2>Answers</h2>"]
    families = list(dict.fromkeys(c.family for h in a.headlines for c in h.fastest))
    legend = " ".join(f"<span>{family_tag(f)}{esc(f)}</span>" for f in families)
    for mode in MODES:  # forward first: its fastest methods and where each family pays, then training's
        mine = [h for h in a.headlines if h.mode == mode]
        if mine:
            parts.append(f"<h3>Fastest methods, {esc(MODE_TITLES[mode])}, at the longest length measured</h3>")
            if mode == MODES[0]:
                parts.append(f"<p class='az-note'>{esc(quality_note(a))} Families: {legend}</p>")
            parts.append(_pattern_cards(mine))
        crossings = _crossover_html(list(a.crossovers), mode)
        parts.append(crossings or (f"<p class='az-note'>{esc(no_crossover_note(mode))}</p>" if mine else ""))
    parts += [_missing_html(list(a.missing)), "</section>"]
    return "".join(parts)


INTERACTIVE_COVERS = ("time_", "memory_")
"""The PNGs the interactive figures replace (their curves against N, every pattern behind buttons); the bar charts
(ratios, difference from softmax, quality) stay as pictures beside them."""


def plots_html(out: Path, images: list[str], figures: str | None) -> str:
    """The plots section: the interactive ``figures`` fragment when given, then each PNG of ``images`` (files under
    ``out``) that it does not replace (:data:`INTERACTIVE_COVERS`), embedded as base64 in a ``figure.az-figure`` with
    its caption; empty when there is nothing to show."""
    shown = [n for n in images if not (figures and Path(n).name.startswith(INTERACTIVE_COVERS))]
    parts = []
    for name in shown:
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        stem = Path(name).stem
        caption = CAPTIONS.get(stem, stem.replace("_", " "))
        parts.append(f"<figure class='az-figure'><img alt='{esc(stem)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    if not figures and not parts:
        return ""
    return f"<section id='plots'><h2>Plots</h2>{figures or ''}<div class='az-plots'>{''.join(parts)}</div></section>"


def row_attributes(header: list[str], row: list[str], mode: str = "") -> dict[str, str]:
    """The filter attributes of a table row, from the columns that say them (``method`` gives family and kind)."""
    col = {h: i for i, h in enumerate(header)}
    attrs = {"mode": mode} if mode else {}
    for name in ("pattern", "backend", "mode"):
        if name in col and row[col[name]] not in ("", "—"):
            attrs[name] = row[col[name]]
    if "method" in col:
        family, exact = method_info(row[col["method"]])
        attrs["family"] = family
        if exact is not None:
            attrs["kind"] = "exact" if exact else "approximate"
    return attrs


def _cell(text: str, numeric: bool, wrap: bool) -> str:
    """A table cell: ``data-value`` from a :class:`~attnzoo.bench.tables.Num`; right-aligned in a numeric column;
    wrapping where the column holds long text."""
    value = getattr(text, "value", None)
    if isinstance(value, float | int) and not isinstance(value, bool):
        number = "Infinity" if value == math.inf else repr(float(value))
        return f"<td data-value='{number}'>{esc(text)}</td>"
    cls = " class='az-n'" if numeric else " class='az-wrap'" if wrap else ""
    return f"<td{cls}>{esc(text)}</td>"


def table_html(table_id: str, header: list[str], body: list[list[str]],
               attributes: list[dict[str, str]] | None = None, meanings: dict[str, str] | None = None) -> str:
    """A sortable table (class ``az-table``): headers with their meaning (``meanings`` over
    :data:`~attnzoo.bench.tables.COLUMN_HELP`) as ``title``, each row with its
    ``attributes`` (one dict per row) as ``data-*``, numeric cells (:class:`~attnzoo.bench.tables.Num`) with
    ``data-value``. Long text cells (a reason) wrap."""
    numeric = [any(isinstance(getattr(r[i], "value", None), float | int) for r in body) for i in range(len(header))]
    helps = {**COLUMN_HELP, **(meanings or {})}
    head = "".join(
        f"<th{' class=az-num' if numeric[i] else ''}"
        + (f" title='{esc(helps[h])}'><span>{esc(h)}</span>" if h in helps else f">{esc(h)}") + "</th>"
        for i, h in enumerate(header))
    wrap = [h in ("reason", "details", "reason in B", "parameters", "sizes") for h in header]
    rows = []
    for r, attrs in zip(body, attributes or [{}] * len(body), strict=True):
        data = "".join(f" data-{k}='{esc(v)}'" for k, v in attrs.items())
        rows.append(f"<tr{data}>" + "".join(_cell(c, n, w) for c, n, w in zip(r, numeric, wrap, strict=True))
                    + "</tr>")
    return (f"<div class='az-scroll'><table class='az-table' id='{esc(table_id)}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def filter_bar(values: dict[str, Iterable[str]]) -> str:
    """The filters over every ``az-table`` of the page: one select per attribute with the values present, and a
    text search."""
    parts = ["<div class='az-filters' id='az-filters'><b>Filter tables:</b>"]
    for name in FILTERS:
        options = sorted(set(values.get(name, ())))
        if len(options) < 2:
            continue
        if name == "family":
            order = family_order()
            options.sort(key=lambda f: order.index(f) if f in order else len(order))
        if name == "pattern":
            options.sort(key=lambda p: PATTERN_ORDER.index(p) if p in PATTERN_ORDER else 9)
        opts = "".join(f"<option value='{esc(o)}'>{esc(o)}</option>" for o in options)
        parts.append(f"<label>{name} <select data-filter='{name}'><option value=''>all</option>{opts}</select>"
                     "</label>")
    parts.append("<label>search <input id='az-search' type='search' placeholder='method, reason…'></label></div>")
    return "".join(parts)


def tables_html(items: list[Section]) -> str:
    """Every table of the report under the filter bar, with a table of contents entry each."""
    values: dict[str, set[str]] = {name: set() for name in FILTERS}
    parts = []
    for i, s in enumerate(items):
        attrs = [row_attributes(s.header, r, s.mode) for r in s.body]
        for a in attrs:
            for k, v in a.items():
                values[k].add(v)
        parts.append(f"<section id='t{i}'><h2>{esc(s.title)}<span class='az-count' id='table-{i}-count'></span>"
                     f"</h2>{table_html(f'table-{i}', s.header, s.body, attrs)}</section>")
    return filter_bar(values) + "".join(parts)


def report_html(results: dict[str, Any], out: Path, images: list[str], figures: str | None = None) -> str:
    """The page for ``results``: facts, answers, plots (the interactive ``figures`` fragment when given, else the PNG
    files ``images`` found under ``out``), then every table."""
    items = sections(results)
    first = answers_html(answers(results))
    nav = ["<a href='#answers'>Answers</a>"] if first else []
    nav += ["<a href='#plots'>Plots</a>"] if figures or images else []
    nav += [f"<a href='#t{i}'>{esc(s.title.split(' (')[0].split(':')[0])}</a>" for i, s in enumerate(items)]
    return page("attnzoo bench", [
        header_html(results), f"<nav class='az-nav'>{''.join(nav)}</nav>", first, plots_html(out, images, figures),
        tables_html(items)])
