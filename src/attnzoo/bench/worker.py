"""Where cases run: a child worker process (the default) or this process.

The worker (``python -m attnzoo.bench.worker [module ...]``) imports attnzoo (registering every method) and any extra
modules named on its command line (a user's own methods), prints ``ready``, then reads one JSON case per line on
stdin and answers one JSON row per line. Running cases in a child keeps the parent's memory (rich, matplotlib, the
results so far) out of the peak resident set, and survives what a method can do to a process: a hang (the parent
kills the worker after ``case_timeout_s``, or after a case's own ``timeout_s`` plus :data:`GRACE_S`, and records
``timeout``), a crash or the kernel's OOM killer (``crashed``).
The worker runs in its own session so that Ctrl-C reaches only the parent, which stops it and keeps what it measured.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

READY = "ready"
GRACE_S = 5.0
"""What the worker gets beyond a case's own ``timeout_s``: a fresh-process case enforces it on its child and reports
the timeout itself, which the worker must have time to pass on."""


def run_any(case: dict[str, Any]) -> dict[str, Any]:
    """Dispatch a case by its ``kind`` (efficiency, approx, quality, fresh), on ``threads`` torch threads if it says
    so (the previous setting is restored afterwards)."""
    import torch

    kind = case.get("kind")
    if kind == "efficiency":
        from attnzoo.bench.efficiency import run_case
    elif kind == "approx":
        from attnzoo.bench.approx import run_case
    elif kind == "quality":
        from attnzoo.bench.quality import run_case
    elif kind == "fresh":
        from attnzoo.bench.fresh import run_case
    else:
        return {**case, "status": "error", "reason": f"unknown case kind {kind!r}"}
    threads = torch.get_num_threads()
    torch.set_num_threads(int(case.get("threads") or threads))
    try:
        return run_case(case)
    finally:
        torch.set_num_threads(threads)


class Runner:
    """Runs cases, isolated in a worker process or in-process; ``close()`` stops the worker."""

    def __init__(
        self, isolate: bool = True, imports: list[str] | None = None, case_timeout_s: float = 600.0,
        log_path: Path | None = None,
    ) -> None:
        self.isolate = isolate
        self.imports = list(imports or [])
        self.case_timeout_s = case_timeout_s
        self.log_path = log_path
        self._proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        if not isolate:
            from attnzoo.bench.measure import setup_process

            setup_process()
            for name in self.imports:
                importlib.import_module(name)

    def run(self, case: dict[str, Any]) -> dict[str, Any]:
        if not self.isolate:
            return run_any(case)
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(case) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            return self._failed(case, "crashed", self._death())
        limit = float(case["timeout_s"]) + GRACE_S if "timeout_s" in case else self.case_timeout_s
        line = self._read_line(proc, limit)
        if line is None:
            self.close()
            return self._failed(case, "timeout", f"no result within {limit:g} s; the worker was stopped")
        if not line:
            return self._failed(case, "crashed", self._death())
        return json.loads(line)

    def _failed(self, case: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
        return {**case, "status": status, "reason": reason}

    def _death(self) -> str:
        proc = self._proc
        self._proc = None
        if proc is None:
            return "the worker process is gone"
        code = proc.wait()
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the kernel's out-of-memory killer?)" if -code == signal.SIGKILL else ""
            return f"the worker process died from {name}{hint}"
        return f"the worker process exited with status {code}"

    def _start(self) -> subprocess.Popen[str]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._log is None:
            self._log = open(self.log_path, "a") if self.log_path is not None else open(os.devnull, "w")  # noqa: SIM115
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "attnzoo.bench.worker", *self.imports],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
            start_new_session=True,
        )
        line = self._read_line(self._proc, 300.0)
        if line is None or line.strip() != READY:
            self.close()
            raise RuntimeError(f"the benchmark worker did not start (see {self.log_path or 'its stderr'})")
        return self._proc

    @staticmethod
    def _read_line(proc: subprocess.Popen[str], timeout: float) -> str | None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            return None
        return proc.stdout.readline()

    def close(self) -> None:
        proc = self._proc
        self._proc = None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str]) -> int:
    """Worker loop: one JSON case per stdin line, one JSON row per stdout line."""
    from attnzoo.bench.measure import setup_process

    setup_process()
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a method prints goes to the log, not into the protocol
    sys.stdout = sys.stderr
    import attnzoo  # noqa: F401  (registers the methods)

    for name in argv:
        importlib.import_module(name)
    answer.write(READY + "\n")
    answer.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        row = run_any(json.loads(line))
        answer.write(json.dumps(row, default=str) + "\n")
        answer.flush()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main(sys.argv[1:]))
