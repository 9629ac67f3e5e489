"""The report's tables: header and rows of each (efficiency, suite cases, difference from softmax, quality, failures),
the run's facts that open a report, and their Markdown rendering (:func:`md_table` is also what ``--compare`` prints
with).

A numeric cell is a :class:`Num`: the text shown (rounded, with :func:`round_to_noise` where a spread was measured)
that also carries the number it stands for, which the HTML page sorts by.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, NamedTuple

from attnzoo.bench.efficiency import BASELINE
from attnzoo.bench.fit import short_length
from attnzoo.bench.quality import accuracy_text, choose_lr

PATTERN_ORDER = ("self/noncausal", "self/causal", "cross/noncausal", "cross/causal")
MAX_DIGITS = 4  # significant digits kept when the spread is zero or unknown is 3; never more than this

# What each column means, one hover away in the HTML page (``title`` of the header cell).
COLUMN_HELP = {
    "N": "sequence length (keys; self-attention: queries too, cross-attention: N/2 queries)",
    "ms": "median wall time of one call, in milliseconds, rounded to the digits its IQR supports",
    "± IQR": "interquartile range of the timed repeats, in milliseconds: the spread of the middle half",
    "× SDPA": "time / SDPA's time at the same pattern, mode and length (below 1: faster than SDPA); rounded to the "
              "digits both IQRs support",
    "peak MiB": "peak memory of the call beyond its inputs, in MiB (resident set on CPU, allocator peak on GPU)",
    "mem × SDPA": "peak memory / SDPA's peak memory at the same pattern, mode and length (below 1: less memory)",
    "GFLOP/s": "floating-point operations per second (FLOPs counted on the warm-up call, or analytic)",
    "fresh MiB": "peak memory of the same call in a fresh process (glibc's defaults), in MiB",
    "time ∝ N^": "exponent p of the power law time = c·N^p fitted over the measured lengths (2: quadratic, "
                 "1: linear)",
    "eff. length (time)": "efficiency length (CAB): the N beyond which the method is faster than SDPA, where the "
                          "fitted time curves cross; ~ = extrapolated beyond the lengths measured; always / never: "
                          "cheaper at every / no length; until N: cheaper only below N",
    "eff. length (mem)": "efficiency length for peak memory (as for time)",
    "rel. L2 vs softmax": "‖O_method − O_softmax‖ / ‖O_softmax‖ on the same inputs: approximation error of an "
                          "approximate method, size of the difference for an exact method of another function",
    "mass recall": "mean softmax attention mass on the keys the method reads (1 = all of it)",
    "density": "fraction of the visible query-key pairs the method reads",
    "kind": "exact: the method computes its own definition exactly; approx: it approximates it",
    "accuracy": "accuracy on the scored positions of a held-out batch (untrained: within 10 % of chance)",
    "chance": "accuracy of guessing: 1 / answer vocabulary",
    "width": "model width (embedding dimension)",
    "train s": "seconds of training",
    "final loss": "training loss at the last step",
}


class Num(str):
    """A table cell: the text shown and ``value``, the number it stands for (``None`` when there is none), by which
    the HTML page sorts. It is a ``str``, so Markdown and every text use of a cell see only the text."""

    value: float | None

    def __new__(cls, text: str, value: float | None) -> Num:
        cell = super().__new__(cls, text)
        cell.value = value
        return cell


class Section(NamedTuple):
    """One table of a report: its title, header and rows, and the mode its rows share (``""`` for none)."""

    title: str
    header: list[str]
    body: list[list[str]]
    mode: str = ""


def round_to_noise(value: float, spread: float | None) -> str:
    """``value`` with the digits its measured ``spread`` (an IQR, same unit) justifies: the last digit kept is the one
    of the spread's leading digit (12.345 ± 0.53 → ``12.3``; ± 2.1 → ``12``; 1234 ± 150 → ``1200``), at least one
    significant digit and at most :data:`MAX_DIGITS`; 3 significant digits when the spread is zero or unknown."""
    if not math.isfinite(value) or value == 0:
        return format(value, "g")
    top = math.floor(math.log10(abs(value)))
    if spread is None or not math.isfinite(spread) or spread <= 0:
        digits = 3
    else:
        digits = min(MAX_DIGITS, max(1, top - math.floor(math.log10(spread)) + 1))
    last = top - digits + 1  # the decimal place of the last digit kept
    rounded = round(value, -last)
    if rounded != 0 and math.floor(math.log10(abs(rounded))) > top:  # 9.96 → 10.0: one digit more to the left
        last += 1
        rounded = round(value, -last)
    return f"{rounded:.{max(0, -last)}f}"


def noisy(value: float | None, spread: float | None, scale: float = 1.0) -> str:
    """``value × scale`` rounded by :func:`round_to_noise` to its spread (same scale), as a sortable cell; an em dash
    for a missing or non-finite value."""
    if value is None or not math.isfinite(value):
        return "—"
    return Num(round_to_noise(value * scale, None if spread is None else spread * scale), value * scale)


def ratio_spread(ratio: float, a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """The spread of ``ratio`` = a's time / b's time from both rows' IQRs (relative spreads add), or ``None``."""
    parts = [(r.get("time_iqr_s"), r.get("time_median_s")) for r in (a, b)]
    if any(iqr is None or not t for iqr, t in parts):
        return None
    return ratio * sum(iqr / t for iqr, t in parts)


def _eff_cell(entries: dict[tuple, dict[str, Any]], key: tuple, metric: str) -> str:
    """An efficiency length as a sortable cell: ``1.2k`` measured, ``~52.9k`` extrapolated, ``until 3k``, ``always``
    (sorts first), ``never`` (last), ``—`` where none was fitted."""
    e = entries.get((*key, metric))
    if e is None or e["kind"] == "unknown":
        return "—"
    n = e.get("length")
    if e["kind"] == "crossing" and n is not None:
        return Num(("~" if e.get("extrapolated") else "") + short_length(n), n)
    if e["kind"] == "until" and n is not None:
        return Num(f"until {short_length(n)}", n)
    return Num(e["kind"], 0.0 if e["kind"] == "always" else math.inf)


def fmt(x: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    """``x × scale`` formatted with ``spec`` (a sortable cell); an em dash for a missing or non-finite value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return Num(format(x * scale, spec), x * scale)


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
              "fresh MiB",
              "time ∝ N^", "eff. length (time)", "eff. length (mem)"]
    base_exp = {e["pattern"]: e.get("baseline_exponent") for e in results.get("efficiency_length", [])
                if e["metric"] == "time" and e["mode"] == mode}
    base_rows = {(r["pattern"], r["length"]): r for r in results["efficiency"]
                 if (r["method"], r["backend"]) == BASELINE and r["mode"] == mode and r.get("status") == "ok"}
    body = []
    for r in rows:
        key = (r["method"], r["backend"], r["pattern"], mode)
        is_base = (r["method"], r["backend"]) == BASELINE
        exp = base_exp.get(r["pattern"]) if is_base else (entries.get((*key, "time")) or {}).get("exponent")
        ratio, base = r.get("time_ratio"), base_rows.get((r["pattern"], r["length"]))
        body.append([
            r["method"], r["backend"], r["pattern"], Num(str(r["length"]), r["length"]),
            noisy(r["time_median_s"], r.get("time_iqr_s"), 1e3), fmt(r.get("time_iqr_s"), ".2g", 1e3),
            noisy(ratio, ratio_spread(ratio, r, base) if ratio and base and not is_base else None),
            fmt(r.get("peak_bytes"), ".3g", 1 / 2**20), fmt(r.get("memory_ratio"), ".2f"),
            fmt(r.get("gflops_per_s"), ".3g"), fmt(r.get("fresh_peak_bytes"), ".3g", 1 / 2**20), fmt(exp, ".2f"),
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
        body.append([r["method"], kind, r["pattern"], setting, fmt(r.get("rel_l2"), ".3g"),
                     fmt(r.get("mass_recall"), ".3f"), fmt(r.get("density"), ".3f")])
    return header, body


def task_label(task: dict[str, Any]) -> str:
    """``mqar (pairs=8, vocab=256)``: a task's name and its settings."""
    extra = ", ".join(f"{k}={v}" for k, v in task.items() if k != "name")
    return f"{task['name']} ({extra})" if extra else task["name"]


def quality_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The sweep's quality rows (a study's, with a ``setting``, have their own tables): accuracy, or ``untrained``
    near chance."""
    header = ["task", "width", "method", "accuracy", "chance", "final loss", "train s"]
    ok = [r for r in results.get("quality", []) if r.get("status") == "ok" and "setting" not in r]
    ok.sort(key=lambda r: (task_label(r["task"]), r["dim"], -r["accuracy"]))
    body = [[task_label(r["task"]), str(r["dim"]), r["method"], accuracy_text(r["accuracy"], r["chance"]),
             f"{r['chance']:.3f}", fmt(r.get("final_loss"), ".3f"), fmt(r.get("train_time_s"), ".1f")] for r in ok]
    return header, body


def quality_points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The quality rows a plot shows: a sweep's as they are; a study's (rows with a ``setting``) at each method's
    chosen learning rate, one row per method and setting with the mean accuracy over its seeds."""
    points = [r for r in results.get("quality", []) if r.get("status") == "ok" and "setting" not in r]
    for rows in _study_rows(results).values():
        for xs in _chosen(rows).values():
            ok = [r for r in xs if r.get("status") == "ok"]
            if ok:
                points.append({**ok[0], "accuracy": sum(r["accuracy"] for r in ok) / len(ok)})
    return points


def _study_rows(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A quality study's trained rows (those with a ``setting``) by method, in run order."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results.get("quality", []):
        if "setting" in r and r.get("lr") is not None:
            by[r["method"]].append(r)
    return by


def _chosen(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """One method's rows at its chosen learning rate, by setting (every seed; failed ones too)."""
    lr = choose_lr(rows)
    cells: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["lr"] == lr:
            cells[r["setting"]].append(r)
    return cells


def _sizes_text(rows: list[dict[str, Any]]) -> str:
    """The size parameters a method used, per sequence length: ``window=4 (seq 32)``."""
    seen: dict[str, list[str]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r.get("seq") or 0):
        if r.get("sizes") and r.get("seq") is not None:
            text = ", ".join(f"{k}={v}" for k, v in r["sizes"].items())
            if f"seq {r['seq']}" not in seen[text]:
                seen[text].append(f"seq {r['seq']}")
    return "; ".join(f"{text} ({', '.join(seqs)})" for text, seqs in seen.items()) or "—"


def study_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """``--suite quality``: per method (ranked by mean accuracy over the grid), its accuracy in every setting at its
    chosen learning rate (the mean over seeds; ``untrained`` near chance), the rate, the seeds and the sizes used."""
    labels = results.get("config", {}).get("settings", [])
    header = ["method", "ID", "layer", "lr", "seeds", *labels, "sizes"]
    lines = []
    for method, rows in _study_rows(results).items():
        chosen = _chosen(rows)
        cells, total = [], 0.0
        for label in labels:
            ok = [r for r in chosen.get(label, []) if r.get("status") == "ok"]
            if ok:
                mean = sum(r["accuracy"] for r in ok) / len(ok)
                total += mean
                cells.append(accuracy_text(mean, ok[0]["chance"]))
            else:
                cells.append(chosen[label][0].get("status", "—") if chosen.get(label) else "—")
        done = [r for xs in chosen.values() for r in xs if r.get("status") == "ok"]
        first = done[0] if done else rows[0]
        lines.append((-total, [method, first.get("mechanism", ""), first.get("layer", ""), fmt(choose_lr(rows), "g"),
                               str(len({r["seed"] for r in done})), *cells, _sizes_text(done)]))
    return header, [line for _, line in sorted(lines, key=lambda x: x[0])]


def lr_sweep_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """``--suite quality``: every method's accuracy at each swept learning rate (first seed), and the rate chosen."""
    lrs = results.get("config", {}).get("lrs", [])
    header = ["method", *(f"lr {lr:g}" for lr in lrs), "chosen"]
    body = []
    for method, rows in _study_rows(results).items():
        sweep = {r["lr"]: r for r in rows if r.get("sweep")}
        cells = [(accuracy_text(r["accuracy"], r["chance"]) if r.get("status") == "ok" else r.get("status", "—"))
                 if (r := sweep.get(lr)) else "—" for lr in lrs]
        body.append([method, *cells, fmt(choose_lr(rows), "g")])
    return header, body


def quality_markdown(results: dict[str, Any]) -> str:
    """``quality.md``: the study's tables with the conditions of the run, as docs/benchmarks.md lists them."""
    c = results.get("config", {})
    out = [
        "# Quality study: what a small model learns with each causal method", "",
        f"`{results.get('command', '')}`: status {results.get('status')}, wall time "
        f"{fmt(results.get('wall_s'), '.0f')} s, {c.get('workers')} worker(s) of {c.get('threads')} torch thread(s), "
        f"fp32, {c.get('device')}.", "",
        f"Model: {c.get('layers')} pre-norm layers of {c.get('heads')} head(s) (the paper's layer parts where attnzoo "
        f"has them: `layer` = paper), trained {c.get('steps')} AdamW steps of {c.get('batch')} sequences "
        f"(warm-up 10 %, cosine decay) for every method and setting; seeds {c.get('seeds')} (each cell is their "
        f"mean). Learning rate: per method, the best of {c.get('lrs')} on MQAR with {c.get('sweep_pairs')} pairs at "
        f"width {c.get('width')} (ties to the larger rate), used for the whole row. "
        "Sizes relative to the sequence: selections read 1/4 of the keys, local patterns reach seq/8 back "
        "(`sizes`). `untrained`: accuracy within 10 % of chance (chance: MQAR 1/(vocab/2), induction 1/vocab, "
        "selective copy 1/(vocab − 3)).", "",
        md_table(*study_table(results)),
        f"Learning-rate sweep (MQAR {c.get('sweep_pairs')} pairs, width {c.get('width')}, first seed):", "",
        md_table(*lr_sweep_table(results)),
        *optional_table("Methods left out or cases without a result:", failures_table(results)),
    ]
    return "\n".join(out)



def suite_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One line per case of a named suite (``attnzoo bench --suite``): what it measures, the figure, its floor and
    whether the floor holds (``pass``/``FAIL``; ``—`` where the case has no floor, ``skipped``/``error`` with the
    reason where nothing was measured)."""
    header = ["suite", "case", "what", "measured", "floor", "result", "details"]
    body = []
    for r in results.get("suites", []):
        if r.get("status") != "ok":
            body.append([r["suite"], r["case"], r["what"], "—", r.get("floor_text", ""), r["status"],
                         r.get("reason", "")])
            continue
        result = {True: "pass", False: "FAIL", None: "—"}[r.get("passed")]
        body.append([r["suite"], r["case"], r["what"], r["measured_text"], r.get("floor_text", ""), result,
                     r.get("details", "")])
    return header, body


def budget_label(fraction: float) -> str:
    """``50 %``, ``3 %``: a cache budget as a percentage."""
    return f"{fraction * 100:g} %"


def _press_grid(results: dict[str, Any], test: str) -> tuple[list[float], dict[str, dict[float, dict[str, Any]]]]:
    """The budgets of ``test``'s press rows and, per press (in run order), its row at each budget."""
    rows = [r for r in results.get("presses", []) if r["test"] == test]
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    grid: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        grid[r["press"]][r["budget"]] = r
    return budgets, grid


def _ranked(grid: dict[str, dict[float, dict[str, Any]]], budgets: list[float], metric: str, best_high: bool,
            ) -> tuple[list[str], dict[tuple[str, float], int]]:
    """Presses ordered by how many budgets below 100 % they have a figure at (most first), then by their mean
    ``metric`` over those (best first); and each press's rank at each budget (1 = best; ties share the better
    rank)."""
    def value(press: str, b: float) -> float | None:
        r = grid[press].get(b)
        return r.get(metric) if r and r.get("status") == "ok" else None

    sign = -1 if best_high else 1
    ranks: dict[tuple[str, float], int] = {}
    for b in budgets:
        scored = [(sign * x, p) for p in grid if (x := value(p, b)) is not None]
        for key, p in scored:
            ranks[(p, b)] = 1 + sum(other < key for other, _ in scored)
    compressed = [b for b in budgets if b < 1.0] or budgets

    def order(press: str) -> tuple[int, float, str]:
        xs = [sign * x for b in compressed if (x := value(press, b)) is not None]
        return -len(xs), sum(xs) / len(xs) if xs else math.inf, press

    return sorted(grid, key=order), ranks


def press_leaderboard(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The retrieval accuracy of every press at every cache budget, with its rank there (1 = best), presses ordered by
    their mean accuracy below 100 %; the full cache (the ceiling) first."""
    budgets, grid = _press_grid(results, "retrieval")
    full = grid.pop("full cache", {})
    order, ranks = _ranked(grid, budgets, "accuracy", best_high=True)
    compressed = [b for b in budgets if b < 1.0]
    header = ["press", "K"] + [budget_label(b) for b in budgets] + ["mean < 100 %", "bytes kept at 10 %"]
    body = []
    if full:
        ceiling = next(iter(full.values()))
        body.append(["full cache (ceiling)", ""] + [fmt(ceiling.get("accuracy"), ".3f")] * len(budgets) + [
            fmt(ceiling.get("accuracy"), ".3f"), "100 %"])
    for press in order:
        cells, xs = [], []
        for b in budgets:
            r = grid[press].get(b, {})
            if r.get("status") == "ok":
                cells.append(f"{r['accuracy']:.3f} ({ranks[(press, b)]})")
                if b in compressed:
                    xs.append(r["accuracy"])
            else:
                cells.append(r.get("status", "—"))
        tenth = grid[press].get(0.1, {})
        kept = budget_label(round(tenth["bytes_fraction"], 3)) if tenth.get("status") == "ok" else "—"
        mean = fmt(sum(xs) / len(xs), ".3f") if xs and len(xs) == len(compressed) else "—"
        body.append([press, next(iter(grid[press].values()))["mechanism"], *cells, mean, kept])
    return header, body


def press_error_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The relative L2 error of one attention layer against the full cache, per press and budget (rank in
    parentheses, 1 = smallest error), presses ordered by their mean error below 100 %."""
    budgets, grid = _press_grid(results, "layer_error")
    order, ranks = _ranked(grid, budgets, "rel_l2", best_high=False)
    header = ["press", "K"] + [budget_label(b) for b in budgets]
    body = []
    for press in order:
        cells = []
        for b in budgets:
            r = grid[press].get(b, {})
            cells.append(f"{r['rel_l2']:.3g} ({ranks[(press, b)]})" if r.get("status") == "ok" else r.get("status",
                                                                                                           "—"))
        body.append([press, next(iter(grid[press].values()))["mechanism"], *cells])
    return header, body


def press_failures(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The press runs without a figure (skipped, error), grouped by press, test and reason (budgets joined)."""
    groups: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
    for r in results.get("presses", []):
        if r.get("status") != "ok":
            groups[(r["press"], r["test"], r["status"], r.get("reason", ""))].append(budget_label(r["budget"]))
    header = ["press", "test", "status", "budgets", "reason"]
    return header, [[p, t, s, ", ".join(bs), why] for (p, t, s, why), bs in groups.items()]


def press_markdown(results: dict[str, Any]) -> str:
    """``presses.md``: the leaderboard and the layer-error table in Markdown, with the conditions of the run, as
    docs/benchmarks.md lists them."""
    c = results.get("config", {})
    task, training, planted = c.get("task", {}), c.get("training", {}), c.get("planted", {})
    model = c.get("model", {})
    out = [
        "# KV-cache presses: quality against cache budget", "",
        f"`{results.get('command', '')}`: status {results.get('status')}, wall time "
        f"{fmt(results.get('wall_s'), '.0f')} s.", "",
        f"Retrieval: {task.get('context')}-token contexts with {task.get('pairs')} key-value pairs among fillers, "
        f"{task.get('queries')} queries each, {c.get('sequences')} sequences; a {training.get('layers')}-layer model "
        f"of width {training.get('dim')} ({training.get('heads')} heads) trained {training.get('steps')} steps on "
        f"{training.get('train_context')}-token contexts (final loss {fmt(model.get('final_loss'), '.3g')}). "
        "Accuracy of the answers (chance 1/"
        f"{task.get('values')}), rank at each budget in parentheses.", "",
        md_table(*press_leaderboard(results)),
        f"Layer error: relative L2 of one softmax layer's decoded outputs against the full cache, planted inputs "
        f"(B={planted.get('batch')}, H={planted.get('heads')}, N={planted.get('context')}, "
        f"D={planted.get('head_dim')}, {planted.get('decode')} decoded tokens; needles, heavy hitters, a recent "
        "band).", "",
        md_table(*press_error_table(results)),
        *optional_table("Runs without a result:", press_failures(results)),
    ]
    return "\n".join(out)


def optional_table(title: str, table: tuple[list[str], list[list[str]]]) -> list[str]:
    """A Markdown table after its title line, or nothing when the table has no rows."""
    return [title, "", md_table(*table)] if table[1] else []


def fidelity_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """``--suite fidelity``: each measured setting's sentence-embedding cosine to the original model (mean and min
    over the sentences), ranked by the mean (1 = closest; ties share the better rank)."""
    rows = sorted((r for r in results.get("fidelity", []) if r.get("status") == "ok"),
                  key=lambda r: (-r["mean_cos"], -r["min_cos"], r["case"]))
    header = ["rank", "method", "ID", "parameters", "mean cos", "min cos", "s"]
    body = [[str(1 + sum(o["mean_cos"] > r["mean_cos"] for o in rows)), r["method"], r["mechanism"], r["params"],
             f"{r['mean_cos']:.5f}", f"{r['min_cos']:.5f}", fmt(r.get("wall_s"), ".1f")] for r in rows]
    return header, body


def fidelity_failures(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The fidelity settings and methods without a figure (left out, skipped, failed), with the reason."""
    header = ["setting", "method", "status", "reason"]
    return header, [[r["case"], r["method"], r["status"], r.get("reason", "")] for r in results.get("fidelity", [])
                    if r.get("status") != "ok"]


def fidelity_markdown(results: dict[str, Any]) -> str:
    """``fidelity.md``: the ranked table with the conditions of the run, as docs/benchmarks.md lists it."""
    c = results.get("config", {})
    out = [
        "# Fidelity of approximate attention inside all-MiniLM-L6-v2", "",
        f"`{results.get('command', '')}`: status {results.get('status')}, wall time "
        f"{fmt(results.get('wall_s'), '.0f')} s, {c.get('threads')} torch thread(s), fp32, CPU.", "",
        f"Model: {c.get('model', 'all-MiniLM-L6-v2')} {c.get('package_version', '')}, 6 layers, 12 heads of 32; "
        f"{c.get('sentences', '?')} fixed sentences ({c.get('tokens_min', '?')}–{c.get('tokens_max', '?')} tokens, "
        f"mean {fmt(c.get('tokens_mean'), '.1f')}; batches of one length, no padding). Every self-attention "
        "layer attends by the method; the figure is the cosine between each sentence's embedding (mean pooling, "
        "L2-normalised) and the original model's (sdpa), mean and min over the sentences; `s`: seconds for the "
        "setting (embedding every sentence, distillation included).", "",
        md_table(*fidelity_table(results)),
        *optional_table("Left out or without a result:", fidelity_failures(results)),
    ]
    return "\n".join(out)


def _fraction(x: float | None) -> str:
    return "full" if x is None else f"1/{round(1 / x)}"


def dynamic_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """``--suite dynamic``: per method, pattern and inputs, ``rel-L2 · mass recall`` at each target density (the
    measured density in the last column, at the smallest one)."""
    rows = [r for r in results.get("dynamic", []) if r.get("kind") == "approximation"]
    fractions = sorted({r["target_density"] for r in rows}, reverse=True)
    cells: dict[tuple[str, str, str], dict[float, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        cells[(r["method"], r["pattern"], r["inputs"])][r["target_density"]] = r
    header = ["method", "ID", "pattern", "inputs", *(f"{_fraction(f)}: rel-L2 · recall" for f in fractions),
              "read at smallest"]
    body = []
    for (method, pattern, kind), by in cells.items():
        first = next(iter(by.values()))
        line = [method, first["mechanism"], pattern, kind]
        for f in fractions:
            r = by.get(f, {})
            line.append(f"{r['rel_l2']:.3f} · {fmt(r.get('mass_recall'), '.3f')}" if r.get("status") == "ok"
                        else r.get("status", "—"))
        last = by.get(fractions[-1], {}) if fractions else {}
        line.append(fmt(last.get("density"), ".3f") if last.get("status") == "ok" else "—")
        body.append(line)
    return header, body


def recall_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """``--suite dynamic``: associative-recall accuracy of the tiny model trained with each method, ranked."""
    rows = [r for r in results.get("dynamic", []) if r.get("kind") == "recall"]
    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: -r["accuracy"])
    header = ["method", "ID", "density", "accuracy", "chance", "final loss", "train s"]
    body = [[r["method"], r["mechanism"], _fraction(r.get("target_density")), f"{r['accuracy']:.3f}",
             fmt(r.get("chance"), ".3f"), fmt(r.get("final_loss"), ".3f"), fmt(r.get("train_time_s"), ".0f")]
            for r in ok]
    body += [[r["method"], r["mechanism"], r.get("status", "?"), r.get("reason", ""), "", "", ""]
             for r in rows if r.get("status") != "ok"]
    return header, body


def dynamic_failures(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The grid cells without a figure, with the reason."""
    header = ["method", "pattern", "inputs", "density", "status", "reason"]
    return header, [[r["method"], r["pattern"], r["inputs"], _fraction(r["target_density"]), r["status"],
                     r.get("reason", "")] for r in results.get("dynamic", [])
                    if r.get("kind") == "approximation" and r.get("status") != "ok"]


def dynamic_markdown(results: dict[str, Any]) -> str:
    """``dynamic.md``: both tables with the conditions of the run, as docs/benchmarks.md lists them."""
    c = results.get("config", {})
    out = [
        "# Dynamic sparse attention at equal density", "",
        f"`{results.get('command', '')}`: status {results.get('status')}, wall time "
        f"{fmt(results.get('wall_s'), '.0f')} s, {c.get('threads')} torch thread(s), fp32, CPU.", "",
        f"Approximation: B=1, H={c.get('heads')}, D={c.get('head_dim')}, N={c.get('seq')}; `planted`: "
        f"{c.get('planted')} scattered keys per query at strength {c.get('strength')}; `random`: q, k ~ N(0, 1.6²). "
        "Each cell: relative L2 error of the output against full softmax · softmax mass on the keys the method reads "
        "(1 = all of it); `read at smallest`: the fraction of visible pairs read at the smallest target density. "
        "`oracle`: block_sparse over the blocks of highest true mass (the ceiling for block selections).", "",
        md_table(*dynamic_table(results)),
        f"Associative recall (MQAR, {c.get('pairs')} pairs, vocabulary {c.get('vocab')}): a {c.get('layers')}-layer "
        f"model of width {c.get('dim')} ({c.get('model_heads')} heads) trained {c.get('steps')} steps of "
        f"{c.get('batch')} sequences at lr {c.get('lr')}, same seed for every method; accuracy on a held-out batch.",
        "", md_table(*recall_table(results)),
        *optional_table("Cells without a result:", dynamic_failures(results)),
    ]
    return "\n".join(out)


def md_table(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table (cells' pipes escaped); a placeholder line when ``body`` is empty."""
    if not body:
        return "_nothing measured_\n"
    esc = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in body]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines) + "\n"


def run_facts(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The facts that open a report, as ``(label, text)`` pairs: status, wall time, command, machine, and for a sweep
    (a config with shapes) the shapes, how time and memory were measured, the phases' time budgets and the efficiency
    cases' outcomes. Markdown and the HTML page render the same pairs."""
    m, c = results.get("machine", {}), results.get("config", {})
    counts: dict[str, int] = defaultdict(int)
    for r in results.get("efficiency", []):
        counts[r.get("status", "?")] += 1
    facts = [
        ("status", str(results.get("status"))),
        ("wall time", f"{fmt(results.get('wall_s'), '.0f')} s"),
        ("command", str(results.get("command", ""))),
        ("machine", f"{m.get('device_name', '?')} ({m.get('cpu_count', '?')} CPUs, {m.get('threads', '?')} torch "
                    f"threads), {m.get('platform', '')}, python {m.get('python', '')}, torch {m.get('torch', '')}, "
                    f"attnzoo {m.get('attnzoo', '')}"),
    ]
    if c.get("batch") is None:  # a named suite: each row says its own shape
        return facts
    facts += [
        ("shapes", f"batch {c.get('batch')}, heads {c.get('heads')} (kv {c.get('kv_heads') or c.get('heads')}), "
                   f"head_dim {c.get('head_dim')}, dtype {c.get('dtype')}, device {c.get('device')}; "
                   "self: seq_q = seq_kv = N; cross: seq_q = N/2, seq_kv = N"),
        ("timing", f"median over up to {c.get('repeats')} repeats after {c.get('warmup')} warm-up call(s)"
                   f"{' (synchronised)' if str(c.get('device', '')).startswith('cuda') else ''}"),
        ("peak memory", str(results.get("memory_method", ""))),
    ]
    if c.get("budgets_s"):
        facts.append(("budgets", ", ".join(f"{k} {fmt(v, 'g')} s" for k, v in c["budgets_s"].items())))
    facts.append(("efficiency cases", ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))))
    return facts


def facts_markdown(facts: list[tuple[str, str]]) -> list[str]:
    """The run's facts as Markdown list items (the status in bold, the command as code)."""
    def text(label: str, value: str) -> str:
        return {"status": f"**{value}**", "command": f"`{value}`"}.get(label, value)

    return [f"- {label}: {text(label, value)}" for label, value in facts]


def sections(results: dict[str, Any]) -> list[Section]:
    """Every table of a report with something in it, in report order. The Markdown summary and the HTML page both
    render this list."""
    out = [Section(f"Efficiency, {mode} (each at its longest measured N)", *efficiency_table(results, mode), mode)
           for mode in ("fwd", "fwd+bwd")]
    out += [Section(title, *table) for title, table in (
        ("Suite cases (each measured against its floor)", suite_table(results)),
        ("Output difference from softmax attention (approximation error for approximate methods)",
         approximation_table(results)),
        ("Quality on synthetic tasks", quality_table(results)),
        ("Quality study: accuracy per setting at each method's chosen learning rate", study_table(results)),
        ("Quality study: learning-rate sweep", lr_sweep_table(results)),
        ("KV-cache presses: retrieval accuracy by cache budget (rank at each budget; full cache = ceiling)",
         press_leaderboard(results)),
        ("KV-cache presses: relative L2 error of one attention layer against the full cache (planted inputs)",
         press_error_table(results)),
        ("KV-cache press runs without a result", press_failures(results)),
        ("Fidelity inside all-MiniLM-L6-v2: sentence-embedding cosine to the original model, ranked",
         fidelity_table(results)),
        ("Fidelity settings left out or without a result", fidelity_failures(results)),
        ("Dynamic sparse attention at equal density: rel-L2 · mass recall against full softmax",
         dynamic_table(results)),
        ("Dynamic sparse attention: associative recall at an equal training budget", recall_table(results)),
        ("Dynamic sparse attention cells without a result", dynamic_failures(results)),
        ("Cases without a measurement", failures_table(results)),
    )]
    return [s for s in out if s.body]
