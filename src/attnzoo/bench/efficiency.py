"""Efficiency cases: time and peak memory of one method × backend × pattern × length × mode.

Shapes (CAB's four patterns): self-attention uses ``seq_q = seq_kv = length``; cross-attention uses ``seq_kv = length``
and ``seq_q = length // 2`` (queries attending a longer source, the shape of prefill against a cache; causal cross is
bottom-right aligned, so every query sees at least half of the keys). The baseline is
``scaled_dot_product_attention`` (method ``softmax``, backend ``sdpa``), measured in the same run on the same shapes.

A case runs ``attnzoo.attention(q, k, v, method=..., backend=..., causal=...)`` exactly as a user would (argument checks
included): ``warmup`` calls (the first also counts FLOPs), then up to ``repeats`` timed calls, fewer if they would take
more than ``budget_s`` in total or, with a ``noise_target``, as soon as three or more agree within it
(:func:`quiet_enough`), each with its peak memory measured (see :mod:`attnzoo.bench.measure`). ``fwd`` runs
under ``torch.no_grad``; ``fwd+bwd`` makes q, k, v (and learnable float parameters) require gradients and calls
``backward`` with a fixed random output gradient.

FLOPs: softmax attention's are analytic (visible query-key pairs, so causal counts half). Every other method's are
counted from ``torch.utils.flop_counter``'s formulas (plus one for CPU flash attention) while its first call runs,
i.e. the FLOPs its fast path really performs; a fused kernel the counter cannot see into (FlexAttention, Triton) is
counted again on meta tensors through the method's ``torch`` path, or its dense reference if it has none, and failing
that taken from the same case on
another backend (``flops_source`` says which).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from attnzoo.api import attention, prepare, select_backend
from attnzoo.bench import measure
from attnzoo.errors import AttnzooError
from attnzoo.registry import Call, Method, get

BASELINE = ("softmax", "sdpa")
MODES = ("fwd", "fwd+bwd")


def shape(
    pattern: str, length: int, batch: int, heads: int, kv_heads: int, head_dim: int, device: str, dtype: str
) -> dict[str, Any]:
    cross = pattern.startswith("cross/")
    return {
        "length": length, "seq_q": max(1, length // 2) if cross else length, "seq_kv": length, "batch": batch,
        "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "device": device, "dtype": dtype,
    }


def plan(
    methods: Iterable[Method],
    patterns: Iterable[str],
    lengths: dict[str, list[int]],
    backends: list[str] | None,
    skip_backends: dict[str, str],
    dims: dict[str, Any],
    run: dict[str, Any],
    mode_patterns: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """Every efficiency case, in :func:`rounds` order, with the SDPA baseline before the methods at each shape.

    ``lengths`` maps a mode to its lengths; ``mode_patterns`` may restrict a mode to some of ``patterns``.
    ``backends`` selects backends by name (None: all registered fast paths; ``reference`` only when named).
    ``skip_backends`` maps a backend name to the reason its cases are recorded as skipped without running. ``dims``
    holds batch/heads/kv_heads/head_dim/device/dtype; ``run`` is copied into each case (warmup, repeats, budget_s,
    noise_target, seed).
    """
    methods = list(methods)
    base_method = get(BASELINE[0])
    cases = []
    patterns = list(patterns)
    for mode, length in rounds(lengths):
        for pattern in [p for p in patterns if p in (mode_patterns or {}).get(mode, patterns)]:
            entries = [(base_method, BASELINE[1])]
            for m in methods:
                for name in [b.name for b in m.backends] + ["reference"]:
                    selected = name in backends if backends is not None else name != "reference"
                    if selected and (m.name, name) != BASELINE:
                        entries.append((m, name))
            for m, name in entries:
                if pattern not in m.spec.patterns:
                    continue
                case = {"kind": "efficiency", "method": m.name, "backend": name, "pattern": pattern, "mode": mode}
                case.update(shape(pattern, length, **dims))
                case.update(run)
                if mode == "fwd+bwd" and not m.spec.differentiable:
                    case["skip"] = "inference-only method (spec.differentiable is False)"
                elif name in skip_backends and (m.name, name) != BASELINE:
                    case["skip"] = skip_backends[name]
                cases.append(case)
    return cases


def rounds(lengths: dict[str, list[int]]) -> list[tuple[str, int]]:
    """The order (mode, length) shapes run in: every forward length, increasing, then every forward+backward length,
    increasing (with fwd 1024/2048/4096 and fwd+bwd 2048: fwd 1024, fwd 2048, fwd 4096, fwd+bwd 2048). A series'
    shorter lengths, and a forward+backward case's forward, are measured before it, so :func:`cutoff_reason` can
    predict a case from the ones before it; the forward curves that show where methods cross SDPA come first, and a
    run cut short by its budget loses training-mode points rather than them."""
    order = {(mode, n) for mode, ls in lengths.items() for n in ls}
    return sorted(order, key=lambda mn: (MODES.index(mn[0]) if mn[0] in MODES else len(MODES), mn[1]))


QUADRATIC_EXPONENT = 1.7
"""A series whose time grows as N^p with p at least this between its two longest measured lengths is taken as
quadratic by :func:`cutoff_reason` (softmax-form methods measure 1.8–2.0 from 1024 to 2048 on one CPU thread;
sub-quadratic ones 0.9–1.5)."""

QUADRATIC_MIN_RATIO = 0.5
"""...and as worth skipping only when it also takes at least this fraction of SDPA's time: a quadratic series much
cheaper than SDPA costs little to measure, and a noisy pair of points cannot then skip a cheap method."""

BACKWARD_FACTOR = 4.0
"""Forward+backward time predicted from the forward time at the same shape (SDPA's backward costs about twice its
forward; through the autograd of a method's torch path it measures nearer three times)."""


def series(row: dict[str, Any]) -> tuple:
    """What makes rows points of one curve: method, backend, pattern and mode."""
    return (row["method"], row["backend"], row["pattern"], row["mode"])


def cutoff_reason(
    case: dict[str, Any], measured: dict[tuple, dict[int, float]], quadratic_cutoff: int | None, cap_s: float | None
) -> str | None:
    """Why ``case`` should be skipped without running, or None: the rule ``--quick`` uses to reach long lengths.

    ``measured`` maps :func:`series` to ``{length: median seconds}`` of the rows measured so far. Two rules, neither
    applied to the SDPA baseline:
    - *known quadratic*: beyond ``quadratic_cutoff``, a series whose time grew as N^p with p ≥
      :data:`QUADRATIC_EXPONENT` between its two longest measured lengths, and which took at least
      :data:`QUADRATIC_MIN_RATIO` of SDPA's time at the longer one, is not measured further: its ratio to SDPA holds
      and its time is predictable, while each call costs about as much as SDPA's;
    - *over the cap*: a case whose time is predicted over ``cap_s`` per call. The prediction grows the longest measured
      point of the series as its measured exponent (at least linearly; quadratically from a single point); a
      forward+backward series with no point yet is predicted from its forward series the same way, times
      :data:`BACKWARD_FACTOR`.
    """
    if (case["method"], case["backend"]) == BASELINE:
        return None
    n = case["length"]
    key = series(case)
    mine = sorted((m, t) for m, t in measured.get(key, {}).items() if m < n)
    factor, basis = 1.0, ""
    if not mine and case["mode"] != MODES[0]:
        forward = (*key[:3], MODES[0])
        mine = sorted((m, t) for m, t in measured.get(forward, {}).items() if m <= n)
        factor, basis = BACKWARD_FACTOR, f"{BACKWARD_FACTOR:g} × its forward at "
    exponent = 2.0
    if len(mine) >= 2:
        (n1, t1), (n2, t2) = mine[-2:]
        exponent = math.log(t2 / t1) / math.log(n2 / n1) if t1 > 0 and t2 > 0 else 2.0
        sdpa = measured.get((*BASELINE, *key[2:]), {}).get(n2)
        if (factor == 1.0 and quadratic_cutoff is not None and n > quadratic_cutoff and exponent >= QUADRATIC_EXPONENT
                and sdpa and t2 >= QUADRATIC_MIN_RATIO * sdpa):
            return (f"quadratic: time ∝ N^{exponent:.2f} from {n1} to {n2} and {t2 / sdpa:.2g}× SDPA's time at {n2}; "
                    f"--quick measures such methods up to N={quadratic_cutoff} (their ratio to SDPA holds beyond)")
    if cap_s is None or not mine:
        return None
    last_n, last_t = mine[-1]
    predicted = factor * last_t * (n / last_n) ** max(1.0, exponent)
    if predicted > cap_s:
        return (f"predicted {predicted:.2g} s per call from {basis}N={last_n}: over --quick's cap of {cap_s:g} s "
                "per case")
    return None


def classify(e: BaseException) -> tuple[str, str]:
    """``(status, reason)`` for an exception raised by a case."""
    text = f"{type(e).__name__}: {e}".strip()
    if len(text) > 600:
        text = text[:600] + " …"
    if isinstance(e, AttnzooError):
        return "unsupported", str(e)
    if isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text.lower():
        return "oom", text
    return "error", text


def resolve(
    m: Method, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, seed: int
) -> tuple[dict[str, Any], Call]:
    """Parameters for this call (defaults first, then the test hints' sample) and the validated :class:`Call`.

    Raises :class:`AttnzooError` when no parameter set is valid or the backend cannot serve the call.
    """
    requires_grad = q.requires_grad
    probe = measure.make_call(
        {
            "batch": q.shape[0], "heads": q.shape[1], "kv_heads": k.shape[1], "seq_q": q.shape[2], "seq_kv": k.shape[2],
            "head_dim": q.shape[3], "head_dim_v": v.shape[3], "device": str(q.device), "dtype": str(q.dtype)[6:],
        },
        causal,
        requires_grad,
    )
    problem: AttnzooError | None = None
    for params in measure.method_params(m, probe, seed):
        try:
            with torch.set_grad_enabled(requires_grad):
                call = prepare(m, q, k, v, causal, None, None, None, params)[0]
                select_backend(m, call, backend)
            return params, call
        except AttnzooError as e:
            problem = e
    assert problem is not None
    raise problem


def pick_backend(m: Method, call: Call, avoid: Iterable[str]) -> str:
    """The fast path ``auto`` would choose for ``call`` (priority order on its device) among those not in ``avoid``;
    ``"auto"`` if none serves it."""
    avoid = set(avoid)
    for b in m.by_priority(call.device.type):
        if b.name not in avoid and b.refusal(call) is None:
            return b.name
    return "auto"


def _warm_flops(
    m: Method, backend: str, step: Callable[[], Any], call: Call, params: dict[str, Any], backward: bool
) -> tuple[int | None, str]:
    """Run the first (warm-up) call, counting its FLOPs where the counter can see them; return them and their source."""
    if backend in ("flex", "triton"):
        step()
        counted = 0
    else:
        counted = measure.count_flops(step)
    if m.name == BASELINE[0]:
        return measure.softmax_flops(call, backward), "analytic"
    if counted > 0:
        return counted, "counted"
    fallback = "torch" if "torch" in [b.name for b in m.backends] and backend != "torch" else "reference"
    try:
        return _meta_flops(m, fallback, call, params, backward), f"counted on meta tensors through the {fallback} path"
    except Exception:  # any failure only means the FLOPs are unknown
        return None, "unknown"


def _meta_flops(m: Method, backend: str, call: Call, params: dict[str, Any], backward: bool) -> int:
    meta = torch.device("meta")
    q = torch.empty(call.batch, call.heads, call.seq_q, call.head_dim, device=meta, dtype=call.dtype)
    k = torch.empty(call.batch, call.kv_heads, call.seq_kv, call.head_dim, device=meta, dtype=call.dtype)
    v = torch.empty(call.batch, call.kv_heads, call.seq_kv, call.head_dim_v, device=meta, dtype=call.dtype)
    moved = {n: (t.detach().to(meta) if isinstance(t, torch.Tensor) else t) for n, t in params.items()}
    for t in (q, k, v):
        t.requires_grad_(backward)

    def run() -> None:
        with torch.set_grad_enabled(backward):
            out = attention(q, k, v, method=m.name, causal=call.causal, backend=backend, **moved)
            if backward:
                out.sum().backward()

    return measure.count_flops(run)


def guarded(case: dict[str, Any], work: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """``case`` plus ``work(case)``'s results, or the failure's status and reason: a benchmark records every failure
    and goes on (only Ctrl-C propagates)."""
    row = dict(case)
    row.update(status="ok", reason="")
    try:
        row.update(work(case))
    except Exception as e:
        row["status"], row["reason"] = classify(e)
    return row


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Measure one efficiency case; a failing method is recorded in the row, never raised."""
    return guarded(case, _measure)


def workload(case: dict[str, Any]) -> tuple[Callable[[], None], Method, Call, dict[str, Any]]:
    """The call an efficiency case times, as ``(step, method, call, params)``: inputs from the case's seed, parameters
    resolved (:func:`resolve`); ``step`` runs the forward (and the backward with a fixed output gradient, then drops
    the gradients) exactly as a user would. The fresh-process probe (:mod:`attnzoo.bench.fresh`) runs the same step."""
    device = torch.device(case["device"])
    m = get(case["method"])
    causal = case["pattern"].endswith("/causal")
    backward = case["mode"] == "fwd+bwd"
    seed = int(case.get("seed", 0))
    q, k, v = measure.make_qkv(case, seed, requires_grad=backward)
    params, call = resolve(m, case["backend"], q, k, v, causal, seed)
    leaves = [q, k, v] + [t for t in params.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    grad_out = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], device=device, dtype=q.dtype)

    def step() -> None:
        with torch.set_grad_enabled(backward):
            out = attention(q, k, v, method=m.name, causal=causal, backend=case["backend"], **params)
            if backward:
                out.backward(grad_out)
                for t in leaves:
                    t.grad = None

    return step, m, call, params


def _measure(case: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(case["device"])
    backward = case["mode"] == "fwd+bwd"
    step, m, call, params = workload(case)
    peak = measure.PeakMemory(device)
    flops, flops_source = _warm_flops(m, case["backend"], step, call, params, backward)
    for _ in range(max(0, int(case.get("warmup", 1)) - 1)):
        step()
    budget = float(case.get("budget_s", 1.0))
    times: list[float] = []
    peaks: list[int] = []
    for _ in range(max(1, int(case.get("repeats", 3)))):
        peak.start()
        times.append(measure.timed(step, device))
        p = peak.stop()
        if p is not None:
            peaks.append(p)
        if sum(times) >= budget or quiet_enough(times, case.get("noise_target")):
            break
    result: dict[str, Any] = measure.spread(times)
    median = result["time_median_s"]
    result.update(
        times_s=times,
        repeats=len(times),
        peak_bytes=max(peaks) if peaks else None,
        flops=flops,
        flops_source=flops_source,
        gflops_per_s=(flops / median / 1e9) if flops and median > 0 else None,
        params=measure.describe_params(params),
    )
    return result


def quiet_enough(times: list[float], target: float | None) -> bool:
    """Whether repeats can stop early: at least three, with an interquartile range within ``target`` of the median
    (None: never early)."""
    if target is None or len(times) < 3:
        return False
    spread = measure.spread(times)
    return spread["time_iqr_s"] <= target * spread["time_median_s"]


def fill_flops(rows: list[dict[str, Any]]) -> None:
    """Give a row whose FLOPs could not be counted (a fused kernel, and no meta-tensor count) those of the same method
    on the same case through another backend, which does the same work."""
    known: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r.get("flops"):
            known.setdefault(shape_key(r) + (r["method"],), r)
    for r in rows:
        other = known.get(shape_key(r) + (r["method"],))
        if r.get("status") == "ok" and not r.get("flops") and other is not None:
            r["flops"] = other["flops"]
            r["flops_source"] = f"as counted for the {other['backend']} backend"
            r["gflops_per_s"] = r["flops"] / r["time_median_s"] / 1e9 if r["time_median_s"] else None


def shape_key(r: dict[str, Any]) -> tuple:
    """What makes two rows the same shape: pattern, mode, length, device, dtype, batch, heads, head sizes."""
    return (r["pattern"], r["mode"], r["length"], r["device"], r["dtype"], r["batch"], r["heads"], r["kv_heads"],
            r["head_dim"])


def attach_ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``time_ratio`` and ``memory_ratio`` (method / SDPA on the same shape, mode, device, dtype) to each row."""

    base = {shape_key(r): r for r in rows if (r["method"], r["backend"]) == BASELINE and r.get("status") == "ok"}
    for r in rows:
        b = base.get(shape_key(r))
        ok = r.get("status") == "ok" and b is not None
        r["time_ratio"] = r["time_median_s"] / b["time_median_s"] if ok and b["time_median_s"] else None
        mem, bmem = r.get("peak_bytes"), (b or {}).get("peak_bytes")
        r["memory_ratio"] = mem / bmem if ok and mem is not None and bmem else None


def attach_fresh(rows: list[dict[str, Any]], fresh_rows: list[dict[str, Any]]) -> None:
    """Give each efficiency row the fresh-process peak (``fresh_peak_bytes``) measured for the same method, backend
    and shape, where there is one (see :mod:`attnzoo.bench.fresh`)."""
    fresh = {shape_key(r) + (r["method"], r["backend"]): r for r in fresh_rows if r.get("status") == "ok"}
    for r in rows:
        match = fresh.get(shape_key(r) + (r["method"], r["backend"]))
        if match is not None:
            r["fresh_peak_bytes"] = match.get("fresh_peak_bytes")
