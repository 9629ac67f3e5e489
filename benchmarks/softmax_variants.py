"""CPU forward timings of S3/S4/S7/S8/S9: every backend (reference included) against SDPA softmax, same run.

fp32, B=1, H=8, N=2048, D=64, no grad; median of 5 runs (3 for references), non-causal then causal.
Usage: PYTHONPATH=src python benchmarks/softmax_variants.py [method ...]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

import attnzoo as az

B, H, N, D = 1, 8, 2048, 64


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (and FlexAttention compile)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    cases = {
        "momentum": {"gamma": 0.5},
        "selective": {
            "query_temp": 0.1 * torch.randn(H, D), "pos_beta": torch.zeros(H), "value_temp": 0.1 * torch.randn(H, D)
        },
        "topk": {"top_k": 64},
        "urpe": {"urpe_coeffs": 1 + 0.1 * torch.randn(H, 2 * N - 1)},
        "score_mod": {"alibi": True, "softcap": 30.0},
    }
    with torch.no_grad():
        for causal in (False, True):
            base = median_seconds(lambda: az.attention(q, k, v, causal=causal), 5)  # noqa: B023
            print(f"softmax sdpa causal={causal}: {base * 1e3:.1f} ms", flush=True)
            for name in names or list(cases):
                params = cases[name]
                for backend in az.get(name).spec.backends:
                    t = median_seconds(
                        lambda: az.attention(q, k, v, method=name, causal=causal, backend=backend, **params),  # noqa: B023
                        3 if backend == "reference" else 5,
                    )
                    print(f"  {name:10s} {backend:9s} {t * 1e3:8.1f} ms  ({t / base:5.2f}x SDPA)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
