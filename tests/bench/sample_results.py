"""A small synthetic sweep result for the report's tests: registered methods of three families on two patterns, with
an error, FlexAttention skips, a refused sweep setting and a quality task.

What it implies (the tests check the report says so):
- self/noncausal, forward at N=1024: ``linear`` is fastest, then ``sliding_window``; SDPA 4.19 ms; ``moba`` is slower;
- self/causal, forward at N=1024: ``lightning`` is fastest, then ``linear`` (moba failed at 1024, measured up to
  512);
- linear and lightning cross SDPA's time between 256 and 1024 (measured), sliding_window too.
"""

from __future__ import annotations

from typing import Any

from attnzoo.bench import results as schema

LENGTHS = (256, 512, 1024)
BWD_LENGTH = 512
FLEX_SKIP = "--quick skips FlexAttention (seconds of compilation per case on CPU)"

# time(N) in seconds per method and pattern (forward); fwd+bwd is 3× that
CURVES = {
    ("softmax", "sdpa"): lambda n: 4e-9 * n * n,
    ("linear", "torch"): lambda n: 1.5e-6 * n,
    ("lightning", "torch"): lambda n: 2e-6 * n,
    ("sliding_window", "torch"): lambda n: 3e-6 * n,
    ("moba", "torch"): lambda n: 1.15e-8 * n * n,
}
CAUSAL_LINEAR = 1.8  # causal linear attention (a prefix sum) is this much slower than noncausal
PATTERNS = {
    "self/noncausal": [("softmax", "sdpa"), ("linear", "torch"), ("sliding_window", "torch"), ("moba", "torch")],
    "self/causal": [("softmax", "sdpa"), ("lightning", "torch"), ("linear", "torch"), ("sliding_window", "torch"),
                    ("moba", "torch")],
}
ERRORS = {"softmax": 0.0, "linear": 1.2, "lightning": 1.1, "sliding_window": 0.5, "moba": 0.05}
ACCURACY = {"softmax": 1.0, "linear": 0.4, "lightning": 0.55, "sliding_window": 0.9, "moba": 0.95}


def row(method: str, backend: str, pattern: str, mode: str, n: int, status: str = "ok",
        reason: str = "") -> dict[str, Any]:
    slower = CAUSAL_LINEAR if (method, pattern) == ("linear", "self/causal") else 1.0
    t = CURVES[(method, backend)](n) * slower * (3 if mode == "fwd+bwd" else 1) if status == "ok" else None
    return {"kind": "efficiency", "method": method, "backend": backend, "pattern": pattern, "mode": mode,
            "length": n, "seq_q": n, "seq_kv": n, "batch": 1, "heads": 4, "kv_heads": 4, "head_dim": 64,
            "device": "cpu", "dtype": "float32", "status": status, "reason": reason, "time_median_s": t,
            "time_iqr_s": None if t is None else 0.02 * t, "peak_bytes": None if t is None else int(t * 4e9),
            "flops": 10, "gflops_per_s": 1.0}


def sample_results() -> dict[str, Any]:
    """The results dict of a sweep as ``sweep.run`` hands it to ``write_report`` (ratios and efficiency lengths are
    filled in there)."""
    eff = []
    for pattern, series in PATTERNS.items():
        for method, backend in series:
            for n in LENGTHS:
                failed = method == "moba" and pattern == "self/causal" and n == 1024
                eff.append(row(method, backend, pattern, "fwd", n, *(("error", "RuntimeError: boom") if failed
                                                                     else ())))
            eff.append(row(method, backend, pattern, "fwd+bwd", BWD_LENGTH))
        eff += [row("sliding_window", "flex", pattern, "fwd", n, "skipped", FLEX_SKIP) for n in LENGTHS]
    approx = [{"kind": "approx", "method": m, "pattern": p, "setting": {}, "status": "ok", "reason": "",
               "rel_l2": ERRORS[m], "exact": m != "moba", "backend": "torch", "mass_recall": 1.0, "density": 1.0}
              for p, series in PATTERNS.items() for m, _ in series if m != "softmax"]
    approx.append({"kind": "approx", "method": "moba", "pattern": "self/causal", "setting": {"top_k": 40},
                   "status": "unsupported", "reason": "top_k: expected at most the number of key blocks, got 40"})
    quality = [{"kind": "quality", "method": m, "task": {"name": "mqar", "pairs": 4, "vocab": 16}, "dim": 32,
                "status": "ok", "reason": "", "accuracy": a, "chance": 0.125, "final_loss": 0.1, "train_time_s": 1.0}
               for m, a in ACCURACY.items()]
    return {"schema": schema.SCHEMA, "status": "complete", "created": "now", "finished": "now", "wall_s": 12.0,
            "command": "attnzoo bench --quick", "machine": {"device_name": "x86_64", "cpu_count": 2, "threads": 1,
                                                            "torch": "2.x"},
            "config": {"batch": 1, "heads": 4, "head_dim": 64, "dtype": "float32", "device": "cpu", "repeats": 3,
                       "warmup": 1, "budgets_s": {"efficiency": 95.0}},
            "memory_method": "peak resident set", "efficiency": eff, "efficiency_length": [],
            "approximation": approx, "quality": quality, "fresh_memory": []}


def completed() -> dict[str, Any]:
    """:func:`sample_results` with ratios to SDPA and efficiency lengths, as ``write_report`` completes it."""
    from attnzoo.bench.efficiency import attach_ratios
    from attnzoo.bench.report import fit_efficiency_lengths

    res = sample_results()
    attach_ratios(res["efficiency"])
    res["efficiency_length"] = fit_efficiency_lengths(res["efficiency"])
    return res
