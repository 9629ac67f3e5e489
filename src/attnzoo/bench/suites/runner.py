"""Run named suite cases: measure each (:data:`MEASURERS`), check its floors, record a row, print the table.

Timing cases run in this process, one at a time, with :func:`attnzoo.bench.measure.interleaved` (the one timer);
memory cases run each side in a fresh process (:func:`attnzoo.bench.fresh.probe`, the one memory probe). A case
that fails is recorded (``error`` with the exception, ``skipped`` when its optional package is missing) and the run
goes on. Rows go to ``results.json`` under ``suites`` (schema ``attnzoo.bench/1.1``) and to ``summary.md`` and
``report.html`` as the suite table (:func:`attnzoo.bench.tables.suite_table`).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo import api
from attnzoo.api import attention
from attnzoo.bench import fresh, measure
from attnzoo.bench.efficiency import classify
from attnzoo.bench.suites import SDPA, Case, Target, find, origin

DECODE_STEPS = 50
Step = Callable[[], None]


def inputs(case: Case, n: int, device: str, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v of shape ``(batch, heads, n, head_dim)`` from seed 0 (the same for every side of a case)."""
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, n, case.head_dim)
    return tuple(torch.randn(*shape, generator=g).to(device).requires_grad_(requires_grad) for _ in range(3))


def bind(case: Case, target: Target, n: int, device: str) -> Step:
    """A step that calls ``target`` on the case's inputs at length ``n`` (forward, or forward+backward with the
    gradients dropped after each step, as a training loop's ``zero_grad(set_to_none=True)`` does); a target with a
    ``workload`` builds its own inputs and call (forward only)."""
    if target.workload is not None:
        return _without_grad(target.workload(case, device))
    q, k, v = inputs(case, n, device, case.backward)
    g = torch.Generator().manual_seed(1)
    extra = {name: t.to(device) for name, t in (target.tensors(n, case.heads, g) if target.tensors else {}).items()}
    causal = case.causal if target.causal is None else target.causal
    if target.peer is not None:
        from attnzoo.bench.suites import peers

        fn = getattr(peers, target.peer)

        def call() -> torch.Tensor:
            return fn(q, k, v, causal=causal, **target.params, **extra)
    elif target.method is None:
        def call() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **extra)
    else:
        def call() -> torch.Tensor:
            return attention(q, k, v, method=target.method, causal=causal, backend=target.backend,
                             **target.params, **extra)

    def step() -> None:
        with torch.set_grad_enabled(case.backward):
            out = call()
            if case.backward:
                out.sum().backward()
                for t in (q, k, v):
                    t.grad = None

    return step


def _without_grad(call: Callable[[], object]) -> Step:
    def step() -> None:
        with torch.no_grad():
            call()

    return step


def workload(name: str, role: str, n: int, device: str = "cpu") -> tuple[Step, str]:
    """The step of one side (``target`` or ``against``) of the case called ``name``, for a fresh process."""
    case = find(name)
    target = case.target if role == "target" else (case.against or SDPA)
    return bind(case, target, n, device), device


def _best(times: dict[Any, list[float]]) -> dict[Any, float]:
    return {k: min(v) for k, v in times.items()}


def _compare(case: Case, device: str) -> tuple[dict[str, float], str]:
    against = case.against or SDPA
    fns = {"target": bind(case, case.target, case.n, device), "against": bind(case, against, case.n, device)}
    t = _best(measure.interleaved(fns, case.rounds, torch.device(device)))
    details = f"{case.target.label} {t['target']:.3g} s, {against.label} {t['against']:.3g} s"
    return {"speedup": t["against"] / t["target"], "time_ratio": t["target"] / t["against"],
            "target_s": t["target"], "against_s": t["against"]}, details


def _scaling(case: Case, device: str) -> tuple[dict[str, float], str]:
    assert case.n2 is not None
    fns = {case.n: bind(case, case.target, case.n, device), case.n2: bind(case, case.target, case.n2, device)}
    t = _best(measure.interleaved(fns, case.rounds, torch.device(device)))
    details = f"N={case.n} {t[case.n]:.3g} s, N={case.n2} {t[case.n2]:.3g} s"
    return {"scaling": t[case.n2] / t[case.n], "target_s": t[case.n], "target2_s": t[case.n2]}, details


def _fresh_job(case: Case, role: str, device: str, threads: int | None) -> dict[str, Any]:
    return {"kind": "suite", "case": case.name, "role": role, "length": case.n, "device": device,
            "threads": threads or case.threads, "calls": case.calls, "prime": case.prime}


def _probe(case: Case, role: str, device: str, threads: int | None) -> dict[str, Any]:
    got = fresh.probe(_fresh_job(case, role, device, threads))
    if got.get("status") != "ok":
        raise RuntimeError(f"fresh process ({role}): {got.get('status')}: {got.get('reason')}")
    return got


def _memory(case: Case, device: str, threads: int | None) -> tuple[dict[str, float], str]:
    mine = _probe(case, "target", device, threads)
    metrics = {"peak_gib": mine["fresh_peak_bytes"] / 2**30}
    details = f"{case.target.label} {metrics['peak_gib']:.3f} GiB above the inputs"
    if case.against is not None:
        theirs = _probe(case, "against", device, threads)
        metrics["against_peak_gib"] = theirs["fresh_peak_bytes"] / 2**30
        details += f"; {case.against.label} {metrics['against_peak_gib']:.3f} GiB"
    return metrics, details


def _fresh(case: Case, device: str, threads: int | None) -> tuple[dict[str, float], str]:
    against = case.against or SDPA
    runs: dict[str, list[dict[str, Any]]] = {"target": [], "against": []}
    for _ in range(case.rounds):
        for role in runs:
            runs[role].append(_probe(case, role, device, threads))
    t = {role: min(min(r["times_s"]) for r in rs) for role, rs in runs.items()}
    peak = {role: max(r["fresh_peak_bytes"] for r in rs) / 2**30 for role, rs in runs.items()}
    details = (f"{case.target.label} {t['target']:.3g} s, peak {peak['target']:.3f} GiB; {against.label} "
               f"{t['against']:.3g} s, peak {peak['against']:.3f} GiB (fresh processes, best of {case.rounds})")
    return {"time_ratio": t["target"] / t["against"], "speedup": t["against"] / t["target"],
            "peak_gib": peak["target"], "against_peak_gib": peak["against"], "target_s": t["target"],
            "against_s": t["against"]}, details


def state_bytes(state: api.DecodeState) -> int:
    """Bytes of a decoding state: a cache's ``nbytes``, else the sum of the state's tensors."""
    data = state.data
    if hasattr(data, "nbytes") and not isinstance(data, torch.Tensor):
        return int(data.nbytes)
    leaves = torch.utils._pytree.tree_leaves(data)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _prefilled(case: Case, target: Target, n: int, device: str) -> api.DecodeState:
    """The state of ``target`` (a decoding method, with its press) after a prefill of ``n`` tokens."""
    assert target.method is not None
    q, k, v = inputs(case, n, device, False)
    press = None
    if target.press is not None:
        from attnzoo.kv.presses import presses

        press = {p.name: p.cls for p in presses()}[target.press](**target.press_params)
    with torch.no_grad():
        return api.prefill(q, k, v, method=target.method, press=press, **target.params)[1]


def _stepper(case: Case, target: Target, n: int, device: str) -> tuple[Step, api.DecodeState]:
    """``DECODE_STEPS`` steps continuing one sequence from a prefill of ``n`` tokens (each call goes on where the last
    stopped, so a cache's storage is appended in place as in a real decode loop), and the state after one step."""
    one = [t[:, :, :1].contiguous() for t in inputs(case, 1, device, False)]
    with torch.no_grad():
        current = [api.step(_prefilled(case, target, n, device), *one)[1]]

    def steps() -> None:
        with torch.no_grad():
            s = current[0]
            for _ in range(DECODE_STEPS):
                s = api.step(s, *one)[1]
            current[0] = s

    return steps, current[0]


def _sdpa_stepper(case: Case, n: int, device: str) -> tuple[Step, int]:
    """One query over ``n`` keys by SDPA, ``DECODE_STEPS`` times, and the bytes of those keys and values."""
    q, k, v = inputs(case, n, device, False)
    q1 = q[:, :, -1:].contiguous()

    def steps() -> None:
        with torch.no_grad():
            for _ in range(DECODE_STEPS):
                F.scaled_dot_product_attention(q1, k, v)

    return steps, sum(t.numel() * t.element_size() for t in (k, v))


def _decode(case: Case, device: str) -> tuple[dict[str, float], str]:
    """Step time and state bytes after prefills of ``n`` and ``n2`` tokens through ``attnzoo.prefill``/``step``."""
    assert case.n2 is not None
    fns, size = {}, {}
    for n in (case.n, case.n2):
        fns[n], state = _stepper(case, case.target, n, device)
        size[n] = state_bytes(state)
    t = {n: x / DECODE_STEPS for n, x in _best(measure.interleaved(fns, case.rounds, torch.device(device))).items()}
    details = (f"after {case.n} tokens {t[case.n] * 1e6:.0f} µs and {size[case.n] / 2**20:.2f} MiB, after {case.n2} "
               f"{t[case.n2] * 1e6:.0f} µs and {size[case.n2] / 2**20:.2f} MiB per step")
    return {"step_ratio": t[case.n2] / t[case.n], "bytes_ratio": size[case.n2] / size[case.n], "step_s": t[case.n],
            "step2_s": t[case.n2]}, details


def _cache_step(case: Case, device: str) -> tuple[dict[str, float], str]:
    """A decoding target's step against SDPA over the same keys, or against another decoding target."""
    against = case.against or SDPA
    fns, size = {}, {}
    fns["target"], state = _stepper(case, case.target, case.n, device)
    size["target"] = state_bytes(state)
    if against.method is None:
        fns["against"], size["against"] = _sdpa_stepper(case, case.n, device)
    else:
        fns["against"], state = _stepper(case, against, case.n, device)
        size["against"] = state_bytes(state)
    t = {r: x / DECODE_STEPS for r, x in _best(measure.interleaved(fns, case.rounds, torch.device(device))).items()}
    details = (f"{case.target.label} {t['target'] * 1e6:.0f} µs/step, {size['target'] / 2**20:.1f} MiB; "
               f"{against.label} {t['against'] * 1e6:.0f} µs/step, {size['against'] / 2**20:.1f} MiB")
    return {"time_ratio": t["target"] / t["against"], "speedup": t["against"] / t["target"],
            "bytes_ratio": size["target"] / size["against"], "target_s": t["target"], "against_s": t["against"]}, \
        details


def _cache_bytes(case: Case, device: str) -> tuple[dict[str, float], str]:
    """The target's state bytes after a prefill of ``n`` tokens over those of the plain fp16 cache of the same tokens
    (what attnzoo holds without a press: keys, values and positions); the bare fp16 keys and values in the details."""
    state = _prefilled(case, case.target, case.n, device)
    q, k, v = (t.half() for t in inputs(case, case.n, device, False))
    with torch.no_grad():
        fp16 = state_bytes(api.prefill(q, k, v, method="softmax")[1])
    bare = k.numel() * k.element_size() + v.numel() * v.element_size()
    mine = state_bytes(state)
    details = (f"{case.target.label} {mine / 2**20:.2f} MiB; the fp16 cache {fp16 / 2**20:.2f} MiB (its keys and "
               f"values alone {bare / 2**20:.2f} MiB: ratio {mine / bare:.3f})")
    return {"bytes_ratio": mine / fp16, "bare_ratio": mine / bare}, details


def _model_forward(case: Case, target: Target, device: str) -> Step:
    """A forward of ``case.n`` tokens through a tiny random Llama whose attention is ``target`` (SDPA when
    ``target.method`` is None)."""
    import transformers

    import attnzoo.integrations.transformers as azhf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=case.heads,
                                      num_key_value_heads=max(1, case.heads // 2), intermediate_size=128,
                                      vocab_size=100, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval().to(device)
    if target.method is not None:
        azhf.configure(model, target.method, **target.params)
    ids = torch.randint(1, 100, (case.batch, case.n), device=device)

    def forward() -> None:
        with torch.no_grad():
            model(ids, use_cache=False)

    return forward


def _model(case: Case, device: str) -> tuple[dict[str, float], str]:
    against = case.against or SDPA
    fns = {"target": _model_forward(case, case.target, device), "against": _model_forward(case, against, device)}
    t = _best(measure.interleaved(fns, case.rounds, torch.device(device)))
    details = f"{case.target.label} {t['target'] * 1e3:.1f} ms, {against.label} {t['against'] * 1e3:.1f} ms"
    return {"speedup": t["against"] / t["target"], "time_ratio": t["target"] / t["against"],
            "target_s": t["target"], "against_s": t["against"]}, details


def measure_case(case: Case, device: str = "cpu", threads: int | None = None) -> tuple[dict[str, float], str]:
    """``(metrics, details)`` of one case (see :mod:`attnzoo.bench.suites` for each measure's metrics)."""
    if case.measure == "memory":
        return _memory(case, device, threads)
    if case.measure == "fresh":
        return _fresh(case, device, threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or case.threads or before)
    try:
        with measure.kept_heap():
            return _timed(case, device)
    finally:
        torch.set_num_threads(before)


def _timed(case: Case, device: str) -> tuple[dict[str, float], str]:
    """The measures that time calls in this process."""
    if case.measure == "compare":
        return _compare(case, device)
    if case.measure == "scaling":
        return _scaling(case, device)
    if case.measure == "cache_step":
        return _cache_step(case, device)
    if case.measure == "cache_bytes":
        return _cache_bytes(case, device)
    if case.measure == "model":
        return _model(case, device)
    return _decode(case, device)


def _metric_text(case: Case, metric: str, x: float) -> str:
    against = (case.against or SDPA).label
    return {"speedup": f"{x:.2f}× ({against} time / this)", "time_ratio": f"{x:.2f}× {against}'s time",
            "scaling": f"t({case.n2})/t({case.n}) = {x:.2f}", "peak_gib": f"{x:.3f} GiB",
            "step_ratio": f"{x:.2f} (step after {case.n2} / after {case.n})",
            "bytes_ratio": f"{x:.3f} ({_bytes_ratio_of(case)})"}[metric]


def _bytes_ratio_of(case: Case) -> str:
    if case.measure == "decode":
        return f"state bytes after {case.n2} / after {case.n}"
    return "bytes / the fp16 cache's" if case.measure == "cache_bytes" else f"bytes / {(case.against or SDPA).label}'s"


def run_case(case: Case, device: str = "cpu", threads: int | None = None, suite: str | None = None) -> dict[str, Any]:
    """The row of one case: what ran, the metrics, the figure and floor texts, ``passed`` (None without a floor).
    ``suite`` names the case's suite (default: the one it is found in)."""
    row: dict[str, Any] = {
        "suite": suite or origin(case.name), "case": case.name, "what": case.what, "measure": case.measure,
        "method": case.target.method or case.target.peer or getattr(case.target.workload, "__name__", "sdpa"),
        "backend": case.target.backend,
        "against": (case.against or SDPA).label if case.measure != "scaling" else None, "mode": case.mode,
        "causal": case.causal, "batch": case.batch, "heads": case.heads, "length": case.n, "length2": case.n2,
        "head_dim": case.head_dim, "device": device, "dtype": "float32", "rounds": case.rounds,
        "threads": threads or case.threads or torch.get_num_threads(),
        "floors": {m: f.text(m) for m, f in case.floors.items()},
        "floor_text": "; ".join(f.text(m) for m, f in case.floors.items()) or "—",
    }
    if case.requires is not None and importlib.util.find_spec(case.requires) is None:
        return {**row, "status": "skipped", "reason": f"the optional package {case.requires!r} is not installed"}
    started = time.perf_counter()
    try:
        metrics, details = measure_case(case, device, threads)
    except Exception as e:  # a failing case is recorded; the suite goes on
        status, reason = classify(e)
        return {**row, "status": status, "reason": reason}
    passed = [f.holds(metrics[m]) for m, f in case.floors.items()]
    return {**row, "status": "ok", "reason": "", "metrics": metrics, "details": details,
            "measured_text": "; ".join(_metric_text(case, m, metrics[m]) for m in case.shown()),
            "passed": all(passed) if passed else None, "wall_s": time.perf_counter() - started}


def run(cases: list[Case], out: Path, command: str = "", device: str = "cpu", threads: int | None = None,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``cases`` in order, echoing each line as it is measured; write results.json and the report to ``out``."""
    from attnzoo.bench.report import write_report
    from attnzoo.bench.results import SCHEMA
    from attnzoo.bench.sweep import machine_info

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema": SCHEMA, "status": "running", "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "finished": None, "wall_s": None, "command": command, "machine": machine_info(device, threads),
        "config": {"cases": [c.name for c in cases], "device": device, "threads": threads},
        "memory_method": fresh.__doc__.split("\n\n")[0] if fresh.__doc__ else "",
        "efficiency": [], "efficiency_length": [], "approximation": [], "quality": [], "fresh_memory": [],
        "suites": [],
    }
    try:
        for case in cases:
            echo(f"{case.name}: {case.what} ...")
            row = run_case(case, device, threads)
            results["suites"].append(row)
            result = {True: "pass", False: "FAIL", None: "no floor"}[row.get("passed")] if row["status"] == "ok" \
                else f"{row['status']}: {row['reason']}"
            echo(f"  {row.get('measured_text', '—')}  [floor {row['floor_text']}] {result}  {row.get('details', '')}")
        results["status"] = "complete"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
    finally:
        results["wall_s"] = time.perf_counter() - started
        results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
        write_report(results, out)
    return results
