"""Suite ``quality`` (issue 14): a Zoology-style study of what a small model learns with each causal method.

Zoology (Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language Models", arXiv:2312.04927)
trains two-layer models on multi-query associative recall (MQAR) over a grid of key-value pair counts and model
widths, sweeping the learning rate per method. This suite does the same at a size a 2-core CPU finishes in an hour,
plus induction copy and selective copy (:mod:`attnzoo.bench.quality` defines the tasks, the model and the training):

- **Grid** (:func:`settings`): MQAR with :attr:`QualityStudy.pairs` pairs (sequence ``3·pairs``, vocabulary
  :attr:`QualityStudy.vocab`) at every width of :attr:`QualityStudy.widths`; induction copy and selective copy at
  :attr:`QualityStudy.width`.
- **Learning rate** (:func:`attnzoo.bench.quality.choose_lr`): each method trains MQAR with
  :attr:`QualityStudy.sweep_pairs` pairs at width :attr:`QualityStudy.width` at every rate of :attr:`QualityStudy.lrs`
  on the first seed; the rate with the best accuracy (ties, within 0.005, to the larger rate) is used for the
  method's whole grid. Zoology sweeps per setting; one sweep per method is what the CPU budget allows. Ties go to the
  larger rate because a tie on the sweep setting hides what the other settings need (measured, one head: softmax
  ties at 1e-3 and 3e-3 on 8 pairs at width 64, but 1e-3 leaves 8 pairs at width 32 at 0.26, 3e-3 solves it).
- **Equal budgets**: every method and setting trains :attr:`QualityStudy.steps` AdamW steps of
  :attr:`QualityStudy.batch` sequences (warm-up over 10 %, cosine decay), :attr:`QualityStudy.layers` layers of
  :attr:`QualityStudy.heads` heads (one, as in Zoology's MQAR models: with two heads of 16 at width 32, softmax
  stalled at 0.48 on 16 pairs where one head of 32 reaches 0.997), the paper's layer parts where attnzoo has them
  (``attnzoo.nn.Attention``'s ``faithful=True``); the seeds of :attr:`QualityStudy.seeds` (the cell is their mean,
  their number is reported).
- **Sizes relative to the sequence** (:func:`attnzoo.bench.quality.relative_params`): density 1/4 for selections,
  a reach of ``seq/8`` for local patterns; each row records the values used (``sizes``, ``params``).
- **Untrained**: a cell within 10 % of chance (:func:`attnzoo.bench.quality.untrained`) shows ``untrained``.

Methods: every registered method with a differentiable causal self-attention pattern that a model layer can call (no
required per-call input); ``landmark`` is left out (its sequences must carry landmark tokens,
:data:`attnzoo.bench.suites.dynamic.NOT_RECALLED`). ``--cases`` picks methods by name; ``softmax`` always runs.

**Resumable.** Each finished case is appended to ``quality.jsonl`` in the output directory the moment it ends; a rerun
into the same directory reuses every recorded case with the same key (method, task, width, seed, learning rate and
training sizes: :func:`case_key`) and trains only the others, so an interrupted study continues where it stopped.
Failed cases (timeout, crash) are recorded too and not retried; delete their lines to retry them.

**Sized for a 2-core CPU** (:data:`CPU`, the default): cases run in two worker processes of one torch thread each
(methods shared out between them). Each method trains 10 cases (3 rates on the sweep setting, 5 other MQAR settings,
induction, selective copy). Measured on the project's 2-core VM: the whole study (31 methods, 310 cases) took 2847 s
(47.5 min) on 1 December 2026 at load average 2–3; since then quality cases no longer run under the
memory-measuring allocator setting (:func:`attnzoo.bench.measure.kept_heap`), which halved one case's time in a
worker (36.9 s → 17.6 s). Models train on the dense reference at these lengths
(:func:`attnzoo.bench.quality.train_backend`: 2–3× faster per step than the block-sparse fast paths). Two threads per
case are no faster on 2 cores (at load 17, 810 ms a step against 54 ms on one thread).

What was cut to fit, against Zoology: pairs 4/8/16 (Zoology: up to 64 pairs, sequences up to 512), widths 32/64
(Zoology: 64–512), vocabulary 64 (Zoology: 8192), 800 steps of 32 sequences (Zoology: tens of thousands of sequences
for many epochs), three learning rates swept once per method on one setting (Zoology: per setting), one seed,
induction and selective copy at one width and sequence 32. :data:`FULL` (``--full``, for a GPU) restores more of it:
pairs up to 64, widths 64–256, four learning rates, three seeds, 3000 steps of 64 sequences.

The tables are in ``summary.md``, ``report.html`` and ``quality.md`` (ready for docs/benchmarks.md); the rows in
``results.json`` under ``quality`` (each with ``setting``, ``lr``, ``sweep``, ``sizes``; schema
``attnzoo.bench/1.5``).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attnzoo.bench.quality import accuracy_text, choose_lr
from attnzoo.bench.suites import QUALITY, by_name, cpu_run
from attnzoo.bench.suites.dynamic import NOT_RECALLED
from attnzoo.bench.worker import Runner
from attnzoo.errors import fail
from attnzoo.registry import Method, all_methods, get

JOURNAL = "quality.jsonl"
KEY_FIELDS = ("method", "task", "dim", "heads", "layers", "steps", "batch", "seed", "lr", "cosine", "device")


@dataclass(frozen=True)
class QualityStudy:
    """The sizes of a quality study (module docstring). ``sweep_pairs``: the MQAR pairs of the learning-rate sweep
    (one of ``pairs``); ``width``: the width of the sweep and of induction and selective copy (one of ``widths``).
    ``workers`` processes run cases side by side, each on ``threads`` torch threads; ``case_timeout_s`` stops a case
    that runs longer."""

    pairs: tuple[int, ...] = (4, 8, 16)
    widths: tuple[int, ...] = (32, 64)
    vocab: int = 64
    induction_seq: int = 32
    induction_vocab: int = 32
    copy_seq: int = 32
    copy_tokens: int = 4
    copy_vocab: int = 16
    sweep_pairs: int = 8
    width: int = 64
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    seeds: tuple[int, ...] = (0,)
    layers: int = 2
    heads: int = 1
    steps: int = 800
    batch: int = 32
    workers: int = 2
    threads: int = 1
    device: str = "cpu"
    case_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.sweep_pairs not in self.pairs:
            raise fail("sweep_pairs", f"one of pairs {self.pairs}", self.sweep_pairs)
        if self.width not in self.widths:
            raise fail("width", f"one of widths {self.widths}", self.width)


CPU = QualityStudy()
FULL = QualityStudy(pairs=(4, 8, 16, 32, 64), widths=(64, 128, 256), induction_seq=128, induction_vocab=64,
                    copy_seq=128, copy_tokens=16, copy_vocab=32, sweep_pairs=16, width=128,
                    lrs=(3e-4, 1e-3, 3e-3, 1e-2), seeds=(0, 1, 2), steps=3000, batch=64, workers=1, device="cuda",
                    case_timeout_s=3600.0)


@dataclass(frozen=True)
class Setting:
    """One cell column of the grid: a task (its generator's name and arguments) at a model width."""

    task: dict[str, Any]
    dim: int

    @property
    def label(self) -> str:
        """``MQAR 8 pairs, w64``, ``induction seq 32, w64``, ``selective copy seq 32, w64`` (vocabularies in the
        run's config)."""
        t = self.task
        what = f"MQAR {t['pairs']} pairs" if t["name"] == "mqar" else f"{t['name'].replace('_', ' ')} seq {t['seq']}"
        return f"{what}, w{self.dim}"


def settings(study: QualityStudy) -> list[Setting]:
    """The grid: MQAR at every width × pairs, then induction and selective copy at ``study.width``."""
    grid = [Setting({"name": "mqar", "pairs": p, "vocab": study.vocab}, w) for w in study.widths for p in study.pairs]
    grid.append(Setting({"name": "induction", "seq": study.induction_seq, "vocab": study.induction_vocab},
                        study.width))
    grid.append(Setting({"name": "selective_copy", "seq": study.copy_seq, "tokens": study.copy_tokens,
                         "vocab": study.copy_vocab}, study.width))
    return grid


def sweep_setting(study: QualityStudy) -> Setting:
    """The setting of the learning-rate sweep: MQAR with ``study.sweep_pairs`` pairs at ``study.width``."""
    return Setting({"name": "mqar", "pairs": study.sweep_pairs, "vocab": study.vocab}, study.width)


def methods(patterns: list[str] | None = None) -> list[Method]:
    """Every registered method with a causal self-attention pattern (registry order), or ``softmax`` and those whose
    names match ``patterns`` (``fnmatch``)."""
    chosen = [m for m in all_methods() if "self/causal" in m.spec.patterns]
    if not patterns:
        return chosen
    picked = by_name(chosen, patterns, "methods with a causal pattern")
    return [m for m in chosen if m.name == "softmax" or m in picked]


def left_out(m: Method) -> str | None:
    """Why ``m`` cannot train in the study's model, or None."""
    if m.name in NOT_RECALLED:
        return NOT_RECALLED[m.name]
    if not m.spec.differentiable:
        return "inference-only method (spec.differentiable is False)"
    required = [p.name for p in m.spec.params if p.required]
    if required:
        return f"takes a required per-call input ({', '.join(required)}) that a model layer does not make"
    return None


def case(method: str, setting: Setting, seed: int, lr: float, study: QualityStudy, sweep: bool) -> dict[str, Any]:
    """The worker case (:func:`attnzoo.bench.quality.run_case`) of one method, setting, seed and learning rate."""
    return {"kind": "quality", "method": method, "mechanism": get(method).spec.mechanism, "task": setting.task,
            "dim": setting.dim, "heads": study.heads, "layers": study.layers, "steps": study.steps,
            "batch": study.batch, "seed": seed, "lr": lr, "cosine": True, "device": study.device,
            "threads": study.threads, "setting": setting.label, "sweep": sweep}


def case_key(row: dict[str, Any]) -> str:
    """What identifies a trained case across runs: method, task, width, model and training sizes, seed, rate."""
    return json.dumps({k: row.get(k) for k in KEY_FIELDS}, sort_keys=True)


def load_journal(out: Path) -> dict[str, dict[str, Any]]:
    """The rows recorded in ``out/quality.jsonl`` by key (a torn last line, from a killed run, is ignored)."""
    path = out / JOURNAL
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[case_key(row)] = row
    return done


class _Study:
    """The shared state of a run: the journal, the rows so far and the stop flag (thread-safe)."""

    def __init__(self, out: Path, rows: list[dict[str, Any]], echo: Callable[[str], None]) -> None:
        self.done = load_journal(out)
        self.rows = rows
        self.echo = echo
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sink = (out / JOURNAL).open("a")
        if self.sink.tell() and not (out / JOURNAL).read_text().endswith("\n"):
            self.sink.write("\n")  # a killed run's torn last line stays a line of its own (ignored on load)

    def train(self, runner: Runner, c: dict[str, Any]) -> dict[str, Any] | None:
        """The row of case ``c``: recorded by an earlier run, or trained now and recorded (None when the run was
        stopped under it)."""
        key = case_key(c)
        row = self.done.get(key)
        resumed = row is not None
        if row is not None:  # its role in this study (the sweep's or not) is this study's
            row = {**row, "sweep": c["sweep"], "setting": c["setting"]}
        if row is None:
            row = runner.run(c)
            if self.stop.is_set():
                return None
        with self.lock:
            self.rows.append(row)
            if not resumed:
                self.sink.write(json.dumps(row, default=str) + "\n")
                self.sink.flush()
        what = f"{row['method']} {row['setting']} seed {row['seed']} lr {row['lr']:g}"
        self.echo(f"{what}: " + (accuracy_text(row["accuracy"], row["chance"]) if row.get("status") == "ok"
                                 else f"{row.get('status')}: {row.get('reason', '')}")
                  + (" (recorded earlier)" if resumed else ""))
        return row

    def close(self) -> None:
        self.sink.close()


def _method(state: _Study, runner: Runner, m: Method, study: QualityStudy) -> None:
    """One method's learning-rate sweep, then its grid at the rate chosen."""
    reference, first = sweep_setting(study), study.seeds[0]
    sweep = []
    for lr in study.lrs:
        row = state.train(runner, case(m.name, reference, first, lr, study, sweep=True))
        if row is None:
            return
        sweep.append(row)
    lr = choose_lr(sweep)
    if lr is None:
        return
    for setting in settings(study):
        for seed in study.seeds:
            if setting == reference and seed == first:
                continue  # trained by the sweep
            if state.train(runner, case(m.name, setting, seed, lr, study, sweep=False)) is None:
                return


def _worker(state: _Study, runner: Runner, work: queue.Queue[Method], study: QualityStudy) -> None:
    while not state.stop.is_set():
        try:
            m = work.get_nowait()
        except queue.Empty:
            return
        _method(state, runner, m, study)


def run(
    out: Path, patterns: list[str] | None = None, study: QualityStudy = CPU, command: str = "",
    echo: Callable[[str], None] = print, isolate: bool = True,
) -> dict[str, Any]:
    """The study for the methods ``patterns`` picks (all causal ones without) in ``study.workers`` worker processes
    (``isolate=False``: in this process, one method at a time); resumes from ``out/quality.jsonl``; writes
    results.json, the report and quality.md under ``out``."""
    from attnzoo.bench.tables import quality_markdown

    chosen = methods(patterns)
    config = {"suite": QUALITY, **asdict(study), "settings": [s.label for s in settings(study)],
              "dtype": "float32"}
    out.mkdir(parents=True, exist_ok=True)
    with cpu_run(out, command, config, study.threads, ("quality.md", quality_markdown), study.device) as results:
        rows = results["quality"]
        for m in chosen:
            reason = left_out(m)
            if reason:
                rows.append({"method": m.name, "mechanism": m.spec.mechanism, "setting": "—", "sweep": False,
                             "status": "skipped", "reason": reason, "task": {"name": "—"}, "dim": None, "seed": None,
                             "lr": None})
        work: queue.Queue[Method] = queue.Queue()
        for m in chosen:
            if not left_out(m):
                work.put(m)
        state = _Study(out, rows, echo)
        workers = max(1, study.workers if isolate else 1)
        runners = [Runner(isolate=isolate, case_timeout_s=study.case_timeout_s,
                          log_path=out / f"worker-quality-{i}.log") for i in range(workers)]
        threads = [threading.Thread(target=_worker, args=(state, r, work, study), daemon=True) for r in runners]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        finally:
            state.stop.set()
            for r in runners:
                r.close()
            for t in threads:
                t.join(10)
            state.close()
    return results
