"""Fresh-process peak memory: one call measured in a new Python interpreter, as a user's first call would run.

Why: the warm figure (:class:`attnzoo.bench.measure.PeakMemory` in the benchmark's worker, where glibc is told to
``mmap`` every allocation of 64 KiB or more) measures the tensors a call keeps alive. A user's process runs with
glibc's defaults, whose dynamic ``mmap`` threshold grows as large blocks are freed, so freed temporaries can stay in
the heap and the resident set can peak far higher: sigmoid attention at H=8, N=16384 peaked at 8 GiB in a fresh
process where the warm figure was tens of MiB. A method whose spec promises sub-quadratic memory
(``spec.subquadratic_memory``) is therefore also measured here, beside its warm figure.

How: the parent starts ``python -m attnzoo.bench.fresh`` and writes one job (JSON) on its stdin. The child, with
glibc's defaults, creates the inputs (q, k, v and the parameters), optionally makes one untimed call (``prime``: for a
method whose cached plan is not part of a call's working memory), resets its peak resident set, makes ``calls`` timed
calls and answers the peak resident set above its value after the inputs existed (``fresh_peak_bytes``) and the call
times. The peak is read as in :class:`~attnzoo.bench.measure.PeakMemory` (``VmHWM`` after ``/proc/self/clear_refs``):
``getrusage``'s ``ru_maxrss`` would carry the parent's peak across fork and exec on Linux. On a GPU the figure is
``torch.cuda.max_memory_allocated`` above the bytes allocated before the calls.

A job is an efficiency case (``kind: "efficiency"``, run through :func:`attnzoo.bench.efficiency.workload`) or one
side of a named suite case (``kind: "suite"``, run through :func:`attnzoo.bench.suites.runner.workload`).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from attnzoo.bench.efficiency import BASELINE, guarded, pick_backend, shape
from attnzoo.bench.measure import make_call
from attnzoo.registry import PATTERNS, Method, get


def probe(job: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """Run ``job`` in a new interpreter; returns ``{"status": "ok", "fresh_peak_bytes", "times_s"}`` or a failure's
    ``status`` (``timeout``, ``crashed``, ``error``) and ``reason``."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        done = subprocess.run([sys.executable, "-m", "attnzoo.bench.fresh"], input=json.dumps(job), text=True,
                              capture_output=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"no result within {timeout_s:g} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"status {done.returncode}"
        return {"status": "crashed", "reason": f"the fresh process ended with {how}: {tail}"}
    return json.loads(lines[-1])


def measure_step(step: Callable[[], Any], device: str, calls: int = 1, prime: bool = False) -> dict[str, Any]:
    """In this (fresh) process: the peak memory of ``calls`` calls of ``step`` above what is live now, and their
    times. Used by the child; the inputs must exist already."""
    import torch

    from attnzoo.bench.measure import PeakMemory, timed

    dev = torch.device(device)
    if prime:
        step()
    peak = PeakMemory(dev)
    if not peak.available:
        return {"status": "unsupported", "reason": "no /proc/self/clear_refs: the peak resident set cannot be reset"}
    peak.start()
    times = [timed(step, dev) for _ in range(max(1, calls))]
    return {"status": "ok", "reason": "", "fresh_peak_bytes": peak.stop(), "times_s": times}


def _child(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    import attnzoo  # noqa: F401  (registers the methods)

    for name in job.get("imports", []):
        importlib.import_module(name)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    if job["kind"] == "efficiency":
        from attnzoo.bench.efficiency import workload

        step = workload(job)[0]
        device = job["device"]
    else:
        from attnzoo.bench.suites.runner import workload as suite_workload

        step, device = suite_workload(job["case"], job["role"], int(job["length"]), job.get("device", "cpu"))
    return measure_step(step, device, int(job.get("calls", 1)), bool(job.get("prime", False)))


def main() -> int:
    """Child: read one job on stdin, answer one JSON line on stdout (anything the method prints goes to stderr)."""
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    job = json.loads(sys.stdin.read())
    row = guarded({}, lambda _: _child(job))  # a failing method is answered as a row, never raised
    answer.write(json.dumps(row, default=str) + "\n")
    answer.flush()
    return 0


def plan(methods: Iterable[Method], patterns: list[str], length: int, dims: dict[str, Any], avoid: Iterable[str],
         run: dict[str, Any]) -> list[dict[str, Any]]:
    """One fresh-process case per method that promises sub-quadratic memory, SDPA's first: forward at ``length``, on
    the first of ``patterns`` (in CAB order) it supports, through its first fast path not in ``avoid`` that serves the
    call. The case is the efficiency case of the same shape with ``kind: "fresh"``."""
    chosen = [get(BASELINE[0])] + [m for m in methods if m.spec.subquadratic_memory and m.name != BASELINE[0]]
    cases = []
    for m in chosen:
        pattern = next((p for p in PATTERNS if p in patterns and p in m.spec.patterns), None)
        if pattern is None:
            continue
        sizes = shape(pattern, length, **dims)
        if m.name == BASELINE[0]:
            backend = BASELINE[1]
        else:
            backend = pick_backend(m, make_call(sizes, pattern.endswith("/causal"), requires_grad=False), avoid)
        cases.append({"kind": "fresh", "method": m.name, "backend": backend, "pattern": pattern, "mode": "fwd",
                      **sizes, **run})
    return cases


def run_case(case: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """Measure a sweep's fresh-process case (see :func:`plan`): its row with ``fresh_peak_bytes`` and ``times_s``."""
    got = probe({**case, "kind": "efficiency"}, float(case.get("timeout_s", timeout_s)))
    return {**case, **{k: v for k, v in got.items() if k != "kind"}}


if __name__ == "__main__":
    sys.exit(main())
