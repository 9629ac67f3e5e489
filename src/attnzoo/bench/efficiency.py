"""Efficiency cases: time and peak memory of one method × backend × pattern × length × mode.

Shapes (CAB's four patterns): self-attention uses ``seq_q = seq_kv = length``; cross-attention uses ``seq_kv = length``
and ``seq_q = length // 2`` (queries attending a longer source, the shape of prefill against a cache; causal cross is
bottom-right aligned, so every query sees at least half of the keys). The baseline is
``scaled_dot_product_attention`` (method ``softmax``, backend ``sdpa``), measured in the same run on the same shapes.

A case runs ``attnzoo.attention(q, k, v, method=..., backend=..., causal=...)`` exactly as a user would (argument checks
included): ``warmup`` calls (the first also counts FLOPs), then up to ``repeats`` timed calls, fewer if they would take
more than ``budget_s`` in total, each with its peak memory measured (see :mod:`attnzoo.bench.measure`). ``fwd`` runs
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
) -> list[dict[str, Any]]:
    """Every efficiency case, in :func:`rounds` order, with the SDPA baseline before the methods at each shape.

    ``lengths`` maps a mode to its lengths. ``backends`` selects backends by name (None: all registered fast paths;
    ``reference`` only when named). ``skip_backends`` maps a backend name to the reason its cases are recorded as
    skipped without running. ``dims`` holds batch/heads/kv_heads/head_dim/device/dtype; ``run`` is copied into each
    case (warmup, repeats, budget_s, seed).
    """
    methods = list(methods)
    base_method = get(BASELINE[0])
    cases = []
    for mode, length in rounds(lengths):
        for pattern in patterns:
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
    """The order (mode, length) shapes run in, so that a run cut short still has the most useful points.

    Each mode's lengths are taken shortest, longest, then the rest in increasing order (two far-apart points already
    give a fitted curve), and the modes alternate: with fwd 256/512/1024 and fwd+bwd 512 the order is fwd 256,
    fwd+bwd 512, fwd 1024, fwd 512.
    """
    queues = {}
    for mode, ls in lengths.items():
        ordered = sorted(set(ls))
        queues[mode] = ordered[:1] + ordered[-1:] + ordered[1:-1] if len(ordered) > 1 else ordered
    order = []
    for i in range(max((len(q) for q in queues.values()), default=0)):
        order += [(mode, q[i]) for mode, q in queues.items() if i < len(q)]
    return order


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
        if sum(times) >= budget:
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
