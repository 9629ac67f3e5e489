"""Write a run's report: complete the results (FLOPs, ratios to SDPA, efficiency lengths, fresh-process figures),
then ``results.json`` (:mod:`~attnzoo.bench.results`), ``summary.md`` (the answers of :mod:`~attnzoo.bench.answers`
and the tables of :mod:`~attnzoo.bench.tables`), the PNG plots (:mod:`~attnzoo.bench.plots`) and ``report.html``
(:mod:`~attnzoo.bench.html_page`, with the interactive figures of :mod:`~attnzoo.bench.interactive` when the optional
``plotly`` package is installed, else the PNGs).

Without matplotlib (the ``[report]`` extra) the JSON, the Markdown and an HTML page without pictures are still written.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attnzoo.bench.answers import answers, answers_markdown
from attnzoo.bench.efficiency import BASELINE, attach_fresh, attach_ratios, fill_flops
from attnzoo.bench.fit import efficiency_length
from attnzoo.bench.html_page import report_html
from attnzoo.bench.interactive import figures_html
from attnzoo.bench.plots import write_plots
from attnzoo.bench.results import save_results
from attnzoo.bench.tables import facts_markdown, md_table, run_facts, sections


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


def summary_markdown(results: dict[str, Any], images: Iterable[str] = ()) -> str:
    """``summary.md``: the run's facts, the answers (as the HTML page gives them), every table and links to the
    plots."""
    out = ["# attnzoo bench", "", *facts_markdown(run_facts(results)), "", *answers_markdown(answers(results))]
    for s in sections(results):
        out += [f"## {s.title}", "", md_table(s.header, s.body)]
    images = list(images)
    if images:
        out += ["## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
    out += ["Column meanings: see docs/bench.md.", ""]
    return "\n".join(out)


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """Complete ``results`` (FLOPs filled in, ratios to SDPA, efficiency lengths, fresh-process peaks beside the warm
    ones) and write results.json, summary.md, the plots and report.html under ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    fill_flops(results["efficiency"])
    attach_ratios(results["efficiency"])
    attach_fresh(results["efficiency"], results.get("fresh_memory", []))
    results["efficiency_length"] = fit_efficiency_lengths(results["efficiency"])
    save_results(out / "results.json", results)
    images = write_plots(results, out)
    (out / "summary.md").write_text(summary_markdown(results, images))
    (out / "report.html").write_text(report_html(results, out, images, figures=figures_html(results)))
    return [out / "results.json", out / "summary.md", out / "report.html", *(out / i for i in images)]
