"""Fresh-process peak memory: one call measured in a fresh process, as a user's first call would run.

Why: the warm figure (:class:`attnzoo.bench.measure.PeakMemory` in the benchmark's worker, where glibc is told to
``mmap`` every allocation of 64 KiB or more) measures the tensors a call keeps alive. A user's process runs with
glibc's defaults, whose dynamic ``mmap`` threshold grows as large blocks are freed, so freed temporaries can stay in
the heap and the resident set can peak far higher: sigmoid attention at H=8, N=16384 peaked at 8 GiB in a fresh
process where the warm figure was tens of MiB. A method whose spec promises sub-quadratic memory
(``spec.subquadratic_memory``) is therefore also measured here, beside its warm figure.

How: each job runs in a child forked from a *zygote*: a process started once per benchmark
(``python -m attnzoo.bench.fresh``) that imports torch and attnzoo and then never computes anything, so
every child starts with the heap, allocator state and thread pools of a new interpreter that has just imported
attnzoo (with glibc's defaults), at a fraction of an interpreter's start-up (~0.1 s instead of 1.5–4 s). The child
creates the inputs (q, k, v and the parameters), optionally makes one untimed call (``prime``: for a method whose
cached plan is not part of a call's working memory), resets its peak resident set, makes ``calls`` timed calls and
answers the peak resident set above its value after the inputs existed (``fresh_peak_bytes``) and the call times.
The zygote kills a child that overruns its timeout and reports one that crashed. The peak is read as in
:class:`~attnzoo.bench.measure.PeakMemory` (``VmHWM`` after ``/proc/self/clear_refs``): ``getrusage``'s
``ru_maxrss`` would carry the parent's peak across fork on Linux. On a GPU the figure is
``torch.cuda.max_memory_allocated`` above the bytes allocated before the calls (the zygote never touches CUDA).

A job is an efficiency case (``kind: "efficiency"``, run through :func:`attnzoo.bench.efficiency.workload`) or one
side of a named suite case (``kind: "suite"``, run through :func:`attnzoo.bench.suites.runner.workload`).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from attnzoo.bench.efficiency import BASELINE, guarded, pick_backend, shape
from attnzoo.bench.measure import make_call
from attnzoo.registry import PATTERNS, Method, get

_zygote: subprocess.Popen[str] | None = None


def probe(job: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """Run ``job`` in a fresh process (a child of the zygote); returns ``{"status": "ok", "fresh_peak_bytes",
    "times_s"}`` or a failure's ``status`` (``timeout``, ``crashed``, ``error``) and ``reason``."""
    global _zygote
    for _attempt in range(2):  # a zygote that died (killed from outside, say) is started again once
        if _zygote is None or _zygote.poll() is not None:
            _zygote = _start_zygote()
        try:
            assert _zygote.stdin is not None and _zygote.stdout is not None
            _zygote.stdin.write(json.dumps({**job, "timeout_s": timeout_s}) + "\n")
            _zygote.stdin.flush()
            line = _zygote.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if line:
            return json.loads(line)
        _zygote = None
    return {"status": "crashed", "reason": "the fresh-process zygote ended without answering"}


def _start_zygote() -> subprocess.Popen[str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    zygote = subprocess.Popen([sys.executable, "-m", "attnzoo.bench.fresh"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    atexit.register(zygote.kill)
    return zygote


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


def _fork_job(job: dict[str, Any]) -> dict[str, Any]:
    """In the zygote: run ``job`` in a forked child; its answer, or why there is none (timeout, crash)."""
    timeout_s = float(job.pop("timeout_s", 600.0))
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as log:
        pid = os.fork()
        if pid == 0:  # the child: anything the method prints goes to the log, the answer to the pipe
            code = 1
            try:  # never return into the zygote's loop, whatever happens
                os.close(read_end)
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                row = guarded({}, lambda _: _child(job))  # a failing method is answered as a row, never raised
                with os.fdopen(write_end, "wb") as out:
                    out.write(json.dumps(row, default=str).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        chunks, deadline = [], time.monotonic() + timeout_s
        while select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(read_end, 1 << 16)  # unbuffered, so select never misses what was already read
            if not chunk:
                break
            chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        if chunks and os.WIFEXITED(status):
            return json.loads(b"".join(chunks))
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and time.monotonic() >= deadline:
            return {"status": "timeout", "reason": f"no result within {timeout_s:g} s"}
        log.seek(0)
        tail = " | ".join(log.read().decode(errors="replace").strip().splitlines()[-3:])
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {os.WEXITSTATUS(status)}"
        return {"status": "crashed", "reason": f"the fresh process ended with {how}: {tail}"}


def zygote() -> int:
    """The zygote: import torch and attnzoo, compute nothing, answer one JSON line per job line on stdin."""
    import torch  # noqa: F401

    import attnzoo  # noqa: F401  (registers the methods)

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        answers.write(json.dumps(_fork_job(json.loads(line)), default=str) + "\n")
        answers.flush()
    return 0


def plan(methods: Iterable[Method], patterns: list[str], length: int, dims: dict[str, Any], avoid: Iterable[str],
         run: dict[str, Any]) -> list[dict[str, Any]]:
    """One fresh-process case per method that promises sub-quadratic memory, SDPA's first: forward at ``length``, on
    the first of ``patterns`` (in CAB order) it supports, through the fast path ``auto`` would choose on the device
    (not in ``avoid``). The case is the efficiency case of the same shape with ``kind: "fresh"``."""
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
        # A FlexAttention backend compiles on its first call in a process (seconds, and the compiler's own memory):
        # one untimed call first, so the figure is the kernel's working memory, not the compiler's.
        cases.append({"kind": "fresh", "method": m.name, "backend": backend, "pattern": pattern, "mode": "fwd",
                      "prime": backend == "flex", **sizes, **run})
    return cases


def run_case(case: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """Measure a sweep's fresh-process case (see :func:`plan`): its row with ``fresh_peak_bytes`` and ``times_s``."""
    got = probe({**case, "kind": "efficiency"}, float(case.get("timeout_s", timeout_s)))
    return {**case, **{k: v for k, v in got.items() if k != "kind"}}


if __name__ == "__main__":
    sys.exit(zygote())
