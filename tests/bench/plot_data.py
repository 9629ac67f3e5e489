"""A small run's results for the plot tests: methods of several families (and names the registry does not know,
family "other") at three lengths and four patterns, SDPA in each, a failed row, quality and approximation rows."""

from __future__ import annotations

from typing import Any

LENGTHS = (256, 512, 1024)
# method -> (backend, time exponent, time at N=256 in ms); SDPA grows as N^2
METHODS = {
    "softmax": ("sdpa", 2.0, 1.0),
    "sigmoid": ("torch", 2.0, 1.5),  # softmax family
    "sliding_window": ("torch", 1.0, 2.0),  # structured
    "token_topk": ("torch", 1.2, 3.0),  # sparse
    "linear": ("torch", 1.0, 4.0),  # linear: crosses SDPA
    "lightning": ("torch", 1.0, 4.2),  # linear
}
CROWD = [f"crowd_{i}" for i in range(12)]  # unknown names: one crowded panel ("other") of nearly equal lines
PATTERNS = ("self/noncausal", "self/causal", "cross/noncausal", "cross/causal")


def row(method: str, backend: str, pattern: str, mode: str, n: int, ms: float | None, status: str = "ok",
        ratio: float | None = None) -> dict[str, Any]:
    return {"kind": "efficiency", "method": method, "backend": backend, "pattern": pattern, "mode": mode,
            "length": n, "status": status, "reason": "" if status == "ok" else "why",
            "time_median_s": None if ms is None else ms / 1e3, "time_iqr_s": None if ms is None else ms / 1e5,
            "peak_bytes": None if ms is None else int(ms * 2**20), "time_ratio": ratio, "memory_ratio": ratio}


def results(lengths: tuple[int, ...] = LENGTHS, crowd: bool = True, quality: bool = True,
            modes: tuple[str, ...] = ("fwd", "fwd+bwd")) -> dict[str, Any]:
    eff = []
    for pattern in PATTERNS:
        for mode in modes:
            for n in lengths:
                base = (n / 256) ** 2
                for method, (backend, power, at256) in METHODS.items():
                    ms = at256 * (n / 256) ** power
                    eff.append(row(method, backend, pattern, mode, n, ms, ratio=ms / base))
                for i, method in enumerate(CROWD if crowd and pattern == "self/noncausal" else []):
                    ms = 2.0 * (n / 256) ** 1.5 * (1 + 0.01 * i)
                    eff.append(row(method, "torch", pattern, mode, n, ms, ratio=ms / base))
    eff.append(row("linear", "triton", "self/causal", "fwd", lengths[0], None, status="error"))
    approx = [{"kind": "approx", "method": m, "backend": b, "pattern": p, "setting": {}, "status": "ok",
               "rel_l2": 1e-7 if m == "sigmoid" else 0.3} for m, (b, _, _) in METHODS.items() if m != "softmax"
              for p in PATTERNS]
    qual = [{"kind": "quality", "method": m, "task": {"name": "mqar", "pairs": p, "vocab": 16}, "dim": 32,
             "status": "ok", "accuracy": 1.0 if m == "softmax" else 0.5 / p * 4, "chance": 0.125}
            for m in METHODS for p in (4, 8)] if quality else []
    return {"schema": "attnzoo.bench/1.5", "status": "complete", "config": {}, "efficiency": eff,
            "approximation": approx, "quality": qual}
