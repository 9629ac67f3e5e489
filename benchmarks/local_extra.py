"""CPU forward timings of P11–P14: the ``torch`` fast path against the dense reference and SDPA, in the same run.

fp32, B=1, H=8, D=64, no grad, 2 threads; medians of interleaved repeats (3 for the references).
Usage: PYTHONPATH=src python benchmarks/local_extra.py [p11 p12 p13 p14]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.masks import dense
from attnzoo.masks.positional import concentric_position_ids, position_causal

Runs = dict[str, Callable[[], object]]


def qkv(n: int) -> list[torch.Tensor]:
    return [torch.randn(1, 8, n, 64) for _ in range(3)]


def p11() -> Runs:
    q, k, v = qkv(16384)
    return {"torch": lambda: az.attention(q, k, v, method="channel_group", backend="torch"),
            "reference": lambda: az.attention(q, k, v, method="channel_group", backend="reference"),
            "sdpa (softmax over positions)": lambda: F.scaled_dot_product_attention(q, k, v)}


def p12() -> Runs:
    q, k, v = qkv(4096 + 16 * 8)
    p = {"num_groups": 16, "latents_per_group": 8}
    return {"torch": lambda: az.attention(q, k, v, method="local_global_latent", backend="torch", **p),
            "reference": lambda: az.attention(q, k, v, method="local_global_latent", backend="reference", **p),
            "sdpa (full)": lambda: F.scaled_dot_product_attention(q, k, v)}


def p13() -> Runs:
    n, layout, start = 4096 + 320, (64, 64), 64
    q, k, v = qkv(n)
    pos = concentric_position_ids(n, layout, start)
    m = dense(position_causal(pos, pos), 1, 1, n, n, "cpu").contiguous()
    p = {"layout": layout, "image_start": start}
    return {"torch": lambda: az.attention(q, k, v, method="concentric_causal", causal=True, backend="torch", **p),
            "reference": lambda: az.attention(q, k, v, method="concentric_causal", causal=True, backend="reference",
                                              **p),
            "sdpa (dense CCA mask, prebuilt)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
            "sdpa (plain causal)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}


def p14() -> Runs:
    q, k, v = qkv(64 * 64)
    reg = 0.3 * torch.randn(8, 64, 4)
    p = {"layout": (64, 64), "window_size": 8}
    return {"torch": lambda: az.attention(q, k, v, method="varied_window", backend="torch", window_regression=reg,
                                          **p),
            "torch, zero regression": lambda: az.attention(q, k, v, method="varied_window", backend="torch", **p),
            "reference": lambda: az.attention(q, k, v, method="varied_window", backend="reference",
                                              window_regression=reg, **p),
            "sdpa (full)": lambda: F.scaled_dot_product_attention(q, k, v)}


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    for name in names:
        runs = globals()[name]()
        times: dict[str, list[float]] = {label: [] for label in runs}
        with torch.no_grad():
            for fn in runs.values():
                fn()
            for rep in range(5):
                for label, fn in runs.items():
                    if label.startswith("reference") and rep >= 3:
                        continue
                    start = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - start)
        for label, ts in times.items():
            print(f"{name} {label}: {statistics.median(ts) * 1e3:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:] or ["p11", "p12", "p13", "p14"])
