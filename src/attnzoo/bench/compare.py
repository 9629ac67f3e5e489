"""``attnzoo bench --compare A.json B.json``: what got faster or slower between two runs.

Efficiency rows measured in both runs are matched on (method, backend, pattern, mode, length, device, dtype, shapes).
A case is ``faster`` or ``slower`` when B's median time differs from A's by more than ``threshold`` (default 10%)
*and* beyond the noise: the two medians' IQR bands (median ± IQR/2, :func:`attnzoo.bench.answers.beyond_noise`) do
not overlap. Otherwise it is ``unchanged``. Peak memory changes of more than ``threshold`` are listed too. Quality rows
are matched on (method, task, width) and accuracy changes of more than 0.02 are listed. Cases measured in only one of
the runs, or that started or stopped failing, are listed as well.

:func:`main` returns the Markdown text the CLI prints and can write ``compare.html``: the same look as
``report.html`` (:mod:`attnzoo.bench.html_page`), every matched case in one sortable, filterable table (by family,
pattern, mode, backend and change).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from attnzoo.bench.answers import beyond_noise
from attnzoo.bench.html_page import badge, filter_bar, header_html, page, row_attributes, table_html
from attnzoo.bench.results import load_results
from attnzoo.bench.tables import Num, md_table, noisy, round_to_noise

QUALITY_CHANGE = 0.02


def _key(r: dict[str, Any]) -> tuple:
    return (r["method"], r["backend"], r["pattern"], r["mode"], r["length"], r["device"], r["dtype"], r["batch"],
            r["heads"], r["kv_heads"], r["head_dim"])


def _spread(ra: dict[str, Any], rb: dict[str, Any], ratio: float) -> float | None:
    """The spread of B's time / A's time from both IQRs (relative spreads add), or ``None`` when one is missing."""
    ia, ib = ra.get("time_iqr_s"), rb.get("time_iqr_s")
    if ia is None or ib is None:
        return None
    return ratio * (ia / ra["time_median_s"] + ib / rb["time_median_s"])


def case_changes(a: dict[str, Any], b: dict[str, Any], threshold: float = 0.1) -> list[dict[str, Any]]:
    """Every case with a median time in both runs: ``case``, ``a``/``b`` (rows), ``ratio`` (B's time / A's),
    ``spread`` (its noise), ``change`` (``faster``, ``slower`` or ``unchanged``) and ``memory`` (B's peak / A's, or
    ``None``); in A's order."""
    rows_b = {_key(r): r for r in b["efficiency"]}
    out = []
    for ra in a["efficiency"]:
        rb = rows_b.get(_key(ra))
        if rb is None or ra["status"] != "ok" or rb["status"] != "ok":
            continue
        ta, tb = ra.get("time_median_s"), rb.get("time_median_s")
        if not ta or not tb:
            continue
        ratio = tb / ta
        moved = abs(ratio - 1) > threshold and beyond_noise(ta, ra.get("time_iqr_s"), tb, rb.get("time_iqr_s"))
        ma, mb = ra.get("peak_bytes"), rb.get("peak_bytes")
        out.append({"case": _key(ra), "a": ra, "b": rb, "ratio": ratio, "spread": _spread(ra, rb, ratio),
                    "change": ("faster" if ratio < 1 else "slower") if moved else "unchanged",
                    "memory": mb / ma if ma and mb else None})
    return out


def compare(a: dict[str, Any], b: dict[str, Any], threshold: float = 0.1) -> dict[str, list[dict[str, Any]]]:
    """Changes from run ``a`` to run ``b``: ``faster``, ``slower``, ``unchanged``, ``memory``, ``status``, ``only_a``,
    ``only_b``, ``quality`` (lists of dicts, largest change first)."""
    rows_a = {_key(r): r for r in a["efficiency"]}
    rows_b = {_key(r): r for r in b["efficiency"]}
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in ("faster", "slower", "unchanged", "memory", "status",
                                                             "only_a", "only_b", "quality")}
    for key in rows_a.keys() | rows_b.keys():
        ra, rb = rows_a.get(key), rows_b.get(key)
        if ra is None or rb is None:
            out["only_b" if ra is None else "only_a"].append({"case": key})
        elif ra["status"] != rb["status"]:
            out["status"].append({"case": key, "a": ra["status"], "b": rb["status"], "reason": rb.get("reason", "")})
    for c in case_changes(a, b, threshold):
        ra, rb = c["a"], c["b"]
        out[c["change"]].append({"case": c["case"], "a": ra["time_median_s"], "b": rb["time_median_s"],
                                 "ratio": c["ratio"], "spread": c["spread"]})
        if c["memory"] is not None and abs(c["memory"] - 1) > threshold:
            out["memory"].append({"case": c["case"], "a": ra["peak_bytes"], "b": rb["peak_bytes"],
                                  "ratio": c["memory"]})
    qa = {(r["method"], str(r["task"]), r["dim"]): r for r in a.get("quality", []) if r.get("status") == "ok"}
    for r in b.get("quality", []):
        old = qa.get((r["method"], str(r["task"]), r["dim"]))
        if r.get("status") == "ok" and old is not None and abs(r["accuracy"] - old["accuracy"]) > QUALITY_CHANGE:
            out["quality"].append({"case": (r["method"], r["task"]["name"], r["dim"]), "a": old["accuracy"],
                                   "b": r["accuracy"], "ratio": r["accuracy"] - old["accuracy"]})
    for name in ("faster", "slower", "memory"):
        out[name].sort(key=lambda c: abs(c["ratio"] - 1), reverse=True)
    out["quality"].sort(key=lambda c: abs(c["ratio"]), reverse=True)
    return out


def _case(key: tuple) -> str:
    return " ".join(str(x) for x in key[:5])


def render(changes: dict[str, list[dict[str, Any]]], a_name: str, b_name: str) -> str:
    """Markdown for a comparison."""
    lines = [f"# attnzoo bench: {a_name} → {b_name}", ""]
    for name, title in (("faster", "Faster"), ("slower", "Slower")):
        body = [[_case(c["case"]), f"{c['a'] * 1e3:.3g}", f"{c['b'] * 1e3:.3g}",
                 f"{round_to_noise(c['ratio'], c['spread'])}×"] for c in changes[name]]
        lines += [f"## {title} ({len(body)})", "", md_table(["case", "A ms", "B ms", "B / A"], body)]
    lines += [f"Unchanged (inside the threshold or the noise): {len(changes['unchanged'])}.", ""]
    body = [[_case(c["case"]), f"{c['a'] / 2**20:.3g}", f"{c['b'] / 2**20:.3g}", f"{c['ratio']:.2f}×"]
            for c in changes["memory"]]
    lines += [f"## Peak memory ({len(body)})", "", md_table(["case", "A MiB", "B MiB", "B / A"], body)]
    body = [[_case(c["case"]), c["a"], c["b"], c["reason"]] for c in changes["status"]]
    lines += [f"## Status changed ({len(body)})", "", md_table(["case", "A", "B", "reason in B"], body)]
    body = [[" ".join(map(str, c["case"])), f"{c['a']:.3f}", f"{c['b']:.3f}", f"{c['ratio']:+.3f}"]
            for c in changes["quality"]]
    lines += [f"## Quality changed ({len(body)})", "", md_table(["method task width", "A", "B", "B − A"], body)]
    lines += [f"Cases only in A: {len(changes['only_a'])}; only in B: {len(changes['only_b'])}.", ""]
    return "\n".join(lines)


CASE_HEADER = ["method", "backend", "pattern", "mode", "N", "A ms", "B ms", "B / A", "change", "memory B / A"]
HELP = {
    "A ms": "run A's median time, rounded to its IQR",
    "B ms": "run B's median time, rounded to its IQR",
    "B / A": "B's time / A's time (below 1: faster in B), rounded to the digits both IQRs support",
    "change": "faster / slower: beyond the threshold and outside the noise (the IQR bands median ± IQR/2 of the two "
              "runs do not overlap); unchanged otherwise",
    "memory B / A": "B's peak memory / A's",
}


def case_table(items: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the compare page's table: every matched case."""
    body = []
    for c in items:
        ra, rb = c["a"], c["b"]
        body.append([ra["method"], ra["backend"], ra["pattern"], ra["mode"], Num(str(ra["length"]), ra["length"]),
                     noisy(ra["time_median_s"], ra.get("time_iqr_s"), 1e3),
                     noisy(rb["time_median_s"], rb.get("time_iqr_s"), 1e3), noisy(c["ratio"], c["spread"]),
                     c["change"], noisy(c["memory"], None)])
    return CASE_HEADER, body


def compare_html(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str, threshold: float = 0.1) -> str:
    """``compare.html``: both runs' facts, the counts, every matched case (sortable, filterable), status and quality
    changes."""
    esc = html.escape
    order = {"slower": 0, "faster": 1, "unchanged": 2}  # regressions first, largest change first within each
    items = sorted(case_changes(a, b, threshold), key=lambda c: (order[c["change"]], -abs(math.log(c["ratio"]))))
    changes = compare(a, b, threshold)
    header, body = case_table(items)
    attrs = [{**row_attributes(header, row), "change": c["change"]} for row, c in zip(body, items, strict=True)]
    values: dict[str, set[str]] = {}
    for d in attrs:
        for k, v in d.items():
            values.setdefault(k, set()).add(v)
    counts = " · ".join(f"{badge(name)} {len(changes[name])}" for name in ("faster", "slower", "unchanged"))
    extra = (f"{len(changes['status'])} status changes, {len(changes['only_a'])} cases only in A, "
             f"{len(changes['only_b'])} only in B, {len(changes['quality'])} quality changes")
    parts = [f"<h1>attnzoo bench: {esc(a_name)} → {esc(b_name)}</h1>",
             f"<p>{counts} <span class='az-note'>({esc(extra)}; threshold {threshold:.0%} and outside the noise)"
             "</span></p>",
             "<details class='az-run'><summary>run A</summary>", header_html(a, f"A: {a_name}"), "</details>",
             "<details class='az-run'><summary>run B</summary>", header_html(b, f"B: {b_name}"), "</details>",
             filter_bar(values),
             "<section id='cases'><h2>Every case measured in both runs<span class='az-count' id='table-cases-count'>"
             "</span></h2>", table_html("table-cases", header, body, attrs, HELP), "</section>"]
    status = [[_case(c["case"]), c["a"], c["b"], c["reason"]] for c in changes["status"]]
    if status:
        parts += ["<section><h2>Status changed</h2>",
                  table_html("table-status", ["case", "A", "B", "reason in B"], status), "</section>"]
    quality = [[" ".join(map(str, c["case"])), Num(f"{c['a']:.3f}", c["a"]), Num(f"{c['b']:.3f}", c["b"]),
                Num(f"{c['ratio']:+.3f}", c["ratio"])] for c in changes["quality"]]
    if quality:
        parts += ["<section><h2>Quality changed</h2>",
                  table_html("table-quality", ["method task width", "A", "B", "B − A"], quality), "</section>"]
    return page(f"attnzoo bench: {a_name} → {b_name}", parts)


def main(a_path: str, b_path: str, threshold: float = 0.1, html_path: Path | None = None) -> str:
    """The comparison's Markdown; with ``html_path``, also write the HTML page there."""
    a, b = load_results(a_path), load_results(b_path)
    a_name, b_name = str(a_path), str(b_path)
    short = (Path(a_path).name, Path(b_path).name)
    if short[0] == short[1]:  # two runs' results.json: name them by their folders
        short = (str(Path(a_path).parent / short[0]), str(Path(b_path).parent / short[1]))
    text = render(compare(a, b, threshold), *short)
    if html_path is not None:
        html_path.write_text(compare_html(a, b, a_name, b_name, threshold))
        text += f"\npage: {html_path}\n"
    return text
