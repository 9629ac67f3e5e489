"""The sweep (``attnzoo bench`` without ``--suite``): plan every case from the registry, run them with live progress,
keep every row as it comes.

Rows are appended to ``<out>/cases.jsonl`` the moment they are measured, and ``results.json`` plus the report are
written at the end, or when the run is interrupted (Ctrl-C keeps what was measured: ``status: "interrupted"``).

``--quick`` is sized for a 2-core CPU and a registry of ~60 methods, at the lengths where methods differ: forward at
512/1024/2048/4096 in all four patterns and forward+backward at 2048 in the two self-attention patterns, batch 1, 4
heads of 64, one warm-up and 3 or 4 repeats (fewer when they pass 0.25 s; stopped early once three agree within 5 %),
torch on one thread (on a shared or busy 2-core machine two threads make small calls up to 10× slower and far noisier).
Lengths run forward first, each mode in increasing order, so each case can be judged from the shorter ones first
(:func:`attnzoo.bench.efficiency.cutoff_reason`): a series measured to grow quadratically (time ∝ N^p, p ≥ 1.7, from
1024 to 2048) while taking at least half of SDPA's time is not run at 4096 (its ratio to SDPA holds; the SDPA baseline
always runs), and a case predicted to take over 1 s per call is skipped (an efficiency case is stopped after 10 s, a
quality case after 60 s); both are recorded as skipped with the reason, so the structured-sparse and linear families'
crossovers with SDPA are measured, not extrapolated. FlexAttention backends are skipped (each compile costs seconds on
CPU: run without ``--quick``, or name ``--backends flex``); quality on MQAR with 4 pairs (vocabulary 16, sequence 12,
chance 1/8) at tiny scale (200 steps of 32 sequences at lr 3e-3, width 32, one thread), a budget on which softmax
reaches ≥ 0.95 (1.0 measured) and a method near chance prints ``untrained``, trained in a second worker on the other
core; fresh-process peak memory at N=4096 for every method whose spec promises sub-quadratic memory (SDPA first). Each
phase has a time budget (efficiency 135 s, approximation 12 s, fresh memory 20 s, quality 150 s beside the others);
cases left when it is spent are recorded as skipped.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnzoo.bench import approx, efficiency, fresh, quality, report
from attnzoo.bench.measure import PeakMemory
from attnzoo.bench.results import SCHEMA
from attnzoo.bench.tables import md_table
from attnzoo.bench.worker import Runner
from attnzoo.errors import fail
from attnzoo.registry import PATTERNS, Method, all_methods, get

FAILED_STOPS = ("timeout", "oom", "crashed")


@dataclass
class Config:
    methods: list[str] | None = None
    patterns: list[str] = field(default_factory=lambda: list(PATTERNS))
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    bwd_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    backends: list[str] | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 2
    heads: int = 16
    kv_heads: int | None = None
    head_dim: int = 64
    warmup: int = 2
    repeats: int = 10
    budget_s: float = 5.0
    case_timeout_s: float = 600.0
    skip_flex: bool = False
    approx_length: int = 1024
    tasks: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    budgets_s: dict[str, float | None] = field(default_factory=dict)
    seed: int = 0
    threads: int | None = None
    quick: bool = False
    isolate: bool = True
    imports: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=lambda: ["efficiency", "approximation", "quality", "fresh"])
    fresh_length: int | None = None  # None: the longest forward length
    overlap_quality: bool = False
    bwd_patterns: list[str] | None = None  # None: every pattern of `patterns`
    quadratic_cutoff: int | None = None  # see efficiency.cutoff_reason
    case_cap_s: float | None = None  # see efficiency.cutoff_reason
    noise_target: float | None = None  # see efficiency.quiet_enough
    quality_timeout_s: float | None = None  # a quality case's time limit (None: case_timeout_s)


def quick_config(**overrides: Any) -> Config:
    cfg = Config(
        lengths=[512, 1024, 2048, 4096], bwd_lengths=[2048], bwd_patterns=["self/noncausal", "self/causal"], batch=1,
        heads=4, head_dim=64, warmup=1, repeats=4, budget_s=0.25, noise_target=0.05, case_timeout_s=10.0,
        quality_timeout_s=60.0,
        quadratic_cutoff=2048, case_cap_s=1.0, skip_flex=True, approx_length=128,
        tasks=[{"name": "mqar", "pairs": 4, "vocab": 16}],
        model={"dim": 32, "heads": 2, "layers": 2, "steps": 200, "batch": 32, "lr": 3e-3, "threads": 1},
        budgets_s={"efficiency": 135.0, "approximation": 12.0, "fresh_memory": 20.0, "quality": 150.0}, threads=1,
        quick=True,
        overlap_quality=True,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def full_config(**overrides: Any) -> Config:
    cfg = Config(
        tasks=[{"name": "mqar", "pairs": p, "vocab": 256} for p in (8, 16, 32, 64)]
        + [{"name": "induction", "seq": 128, "vocab": 64}, {"name": "selective_copy", "seq": 128, "tokens": 16,
                                                             "vocab": 32}],
        model={"dim": 128, "heads": 4, "layers": 2, "steps": 1500, "batch": 64, "lr": 3e-3, "widths": [64, 128]},
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def select_methods(names: list[str] | None) -> list[Method]:
    """The methods to benchmark (all registered ones by default); an unknown name raises with suggestions."""
    if not names:
        return all_methods()
    return [get(n) for n in names]


def machine_info(device: str, threads: int | None) -> dict[str, Any]:
    from attnzoo import __version__

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "attnzoo": __version__, "cpu_count": os.cpu_count(), "threads": threads or torch.get_num_threads(),
        "device": device, "device_name": name, "cuda": torch.version.cuda if dev.type == "cuda" else None,
    }


class Progress:
    """``rich`` live progress when available, else a line per phase on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self._rich: Any = None
        if enabled:
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as RichProgress
            except ImportError:
                pass
            else:
                self._rich = RichProgress(
                    TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[current]}"), transient=False,
                )

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Any]:
        if self._rich is not None:
            yield self._rich.add_task(name, total=total, current="")
            return
        print(f"attnzoo bench: {name} ({total} cases)", file=sys.stderr, flush=True)
        yield None

    def advance(self, task: Any, label: str) -> None:
        if self._rich is not None and task is not None:
            self._rich.update(task, advance=1, current=label)

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()


def _label(case: dict[str, Any]) -> str:
    parts = [case["method"], case.get("backend", ""), case.get("pattern", ""), case.get("mode", ""),
             str(case.get("length", "")), (case.get("task") or {}).get("name", "")]
    return " ".join(p for p in parts if p)


def plan_all(cfg: Config) -> dict[str, list[dict[str, Any]]]:
    methods = select_methods(cfg.methods)
    bad = [p for p in cfg.patterns if p not in PATTERNS]
    if bad:
        raise fail("patterns", f"some of {list(PATTERNS)}", bad)
    dims = {"batch": cfg.batch, "heads": cfg.heads, "kv_heads": cfg.kv_heads or cfg.heads, "head_dim": cfg.head_dim,
            "device": cfg.device, "dtype": cfg.dtype}
    skip = {"flex": "--quick skips FlexAttention (seconds of compilation per case on CPU); run without --quick or "
                    "pass --backends flex"} if cfg.skip_flex and not (cfg.backends and "flex" in cfg.backends) else {}
    plans: dict[str, list[dict[str, Any]]] = {"efficiency": [], "approximation": [], "fresh_memory": [], "quality": []}
    if "efficiency" in cfg.phases:
        lengths = {"fwd": cfg.lengths, "fwd+bwd": cfg.bwd_lengths}
        run = {"warmup": cfg.warmup, "repeats": cfg.repeats, "budget_s": cfg.budget_s, "seed": cfg.seed,
               "threads": cfg.threads, "noise_target": cfg.noise_target}
        plans["efficiency"] = efficiency.plan(
            methods, cfg.patterns, {k: v for k, v in lengths.items() if v}, cfg.backends, skip, dims, run,
            {"fwd+bwd": cfg.bwd_patterns} if cfg.bwd_patterns is not None else None)
    if "approximation" in cfg.phases:
        plans["approximation"] = approx.plan(methods, cfg.patterns, cfg.approx_length, dims, cfg.seed,
                                             "self/noncausal", list(skip))
        for case in plans["approximation"]:
            case["threads"] = cfg.threads
    if "fresh" in cfg.phases and (cfg.fresh_length or cfg.lengths):
        length = cfg.fresh_length or max(cfg.lengths)
        run = {"seed": cfg.seed, "threads": cfg.threads, "timeout_s": cfg.case_timeout_s, "imports": cfg.imports}
        plans["fresh_memory"] = fresh.plan(methods, cfg.patterns, length, dims, list(skip), run)
    if "quality" in cfg.phases and cfg.tasks:
        model = {k: v for k, v in cfg.model.items() if k != "widths"}
        for width in cfg.model.get("widths", [model.get("dim", 64)]):
            model["dim"] = width
            tasks = cfg.tasks if width == cfg.model.get("dim", width) else [t for t in cfg.tasks if t["name"] == "mqar"]
            plans["quality"] += quality.plan(methods, tasks, {**model, "avoid": list(skip)}, cfg.seed, cfg.device)
        if cfg.quality_timeout_s is not None:
            for case in plans["quality"]:
                case["timeout_s"] = cfg.quality_timeout_s
    return plans


class _Recorder:
    """Keeps rows in ``results`` and appends each to ``cases.jsonl`` at once (thread-safe: quality may run beside)."""

    def __init__(self, results: dict[str, Any], path: Path) -> None:
        self.results = results
        self.sink = path.open("w")
        self.lock = threading.Lock()

    def __call__(self, section: str, row: dict[str, Any]) -> None:
        with self.lock:
            self.results[section].append(row)
            self.sink.write(json.dumps({"section": section, **row}, default=str) + "\n")
            self.sink.flush()

    def close(self) -> None:
        with self.lock:
            self.sink.close()


def run(cfg: Config, out: Path, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``, writing rows to ``out`` as they come and the report at the end.

    With ``cfg.overlap_quality`` (``--quick`` on a machine with two or more cores and one torch thread per case) the
    quality phase trains in a second worker process beside the efficiency and approximation phases, on the other core.
    """
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_all(cfg)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema": SCHEMA, "status": "running", "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "finished": None, "wall_s": None, "command": command, "machine": machine_info(cfg.device, cfg.threads),
        "config": asdict(cfg), "memory_method": PeakMemory.source(torch.device(cfg.device))
        + ("" if cfg.isolate else " (cases run in the calling process)"),
        "efficiency": [], "efficiency_length": [], "approximation": [], "quality": [], "fresh_memory": [], "suites": [],
    }
    record = _Recorder(results, out / "cases.jsonl")
    stop = threading.Event()
    runners = [Runner(isolate=cfg.isolate, imports=cfg.imports, case_timeout_s=cfg.case_timeout_s,
                      log_path=out / "worker.log")]
    beside = (cfg.overlap_quality and cfg.isolate and (os.cpu_count() or 1) >= 2 and cfg.threads == 1
              and bool(plans["quality"]))
    side: threading.Thread | None = None
    try:
        with Progress(progress) as bar:
            if beside:
                runners.append(Runner(isolate=True, imports=cfg.imports, case_timeout_s=cfg.case_timeout_s,
                                      log_path=out / "worker-quality.log"))
                side = threading.Thread(target=_run_phase, daemon=True, args=(
                    "quality", plans["quality"], runners[1], record, bar, cfg.budgets_s.get("quality"), stop))
                side.start()
            for section in ("efficiency", "approximation", "fresh_memory") + (() if beside else ("quality",)):
                if plans[section]:
                    _run_phase(section, plans[section], runners[0], record, bar, cfg.budgets_s.get(section), stop,
                               cfg)
            if side is not None:
                while side.is_alive():
                    side.join(0.2)
        results["status"] = "complete"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
    finally:
        stop.set()
        for runner in runners:
            runner.close()
        if side is not None:
            side.join(10)
        record.close()
        results["wall_s"] = time.perf_counter() - started
        results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
        report.write_report(results, out)
    return results


def _run_phase(section: str, cases: list[dict[str, Any]], runner: Runner, record: _Recorder, bar: Progress,
               budget_s: float | None, stop: threading.Event, cfg: Config | None = None) -> None:
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    stopped: dict[tuple, tuple[str, int]] = {}
    measured: dict[tuple, dict[int, float]] = defaultdict(dict)
    with bar.phase(section, len(cases)) as task:
        for case in cases:
            if stop.is_set():
                return
            key = efficiency.series(case) if section == "efficiency" else None
            if "skip" in case:
                row = {**{k: v for k, v in case.items() if k != "skip"}, "status": "skipped", "reason": case["skip"]}
            elif key in stopped and case["length"] >= stopped[key][1]:
                status, length = stopped[key]
                row = {**case, "status": "skipped", "reason": f"length {length} ended in {status}"}
            elif key is not None and cfg is not None and (cut := efficiency.cutoff_reason(
                    case, measured, cfg.quadratic_cutoff, cfg.case_cap_s)) is not None:
                row = {**case, "status": "skipped", "reason": cut}
            elif deadline is not None and time.perf_counter() > deadline:
                row = {**case, "status": "skipped", "reason": f"the {section} time budget ({budget_s:g} s) was spent"}
            else:
                row = runner.run(case)
                if stop.is_set():
                    return  # the worker was stopped under this case: its row says nothing about the method
                if key is not None and row.get("status") == "ok":
                    measured[key][case["length"]] = row["time_median_s"]
                if key is not None and row.get("status") in FAILED_STOPS and (
                        key not in stopped or case["length"] < stopped[key][1]):
                    stopped[key] = (row["status"], case["length"])
            record(section, row)
            bar.advance(task, _label(case))


def summary_table(results: dict[str, Any]) -> None:
    """Print the end-of-run summary: per method, its best backend at the longest forward length, and quality."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results["efficiency"]:
        if r.get("status") != "ok" or r["mode"] != "fwd" or r.get("time_ratio") is None:
            continue
        key = (r["method"], r["pattern"])
        old = best.get(key)
        if old is None or (r["length"], -r["time_ratio"]) > (old["length"], -old["time_ratio"]):
            best[key] = r
    accuracy: dict[str, list[str]] = defaultdict(list)
    for r in results.get("quality", []):
        if r.get("status") == "ok":
            accuracy[r["method"]].append(quality.accuracy_text(r["accuracy"], r["chance"], ".2f"))
    header = ["method", "pattern", "N", "best backend", "time × SDPA", "memory × SDPA", "accuracy"]
    body = [[m, p, str(r["length"]), r["backend"], f"{r['time_ratio']:.2f}",
             "—" if r.get("memory_ratio") is None else f"{r['memory_ratio']:.2f}", " ".join(accuracy.get(m, []))]
            for (m, p), r in sorted(best.items())]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(md_table(header, body))
        return
    table = Table(title=f"attnzoo bench ({results['status']}, {results['wall_s']:.0f} s)")
    for h in header:
        table.add_column(h)
    for row in body:
        table.add_row(*row)
    console = Console()
    console.width = max(console.width, 110)  # a pipe gets 80 columns, too few for the pattern names
    console.print(table)
