"""Benchmark the local (P-family) fast paths against dense SDPA in the same run (fp32, B=1, H=8, D=64).

Usage: PYTHONPATH=src python benchmarks/local_floors.py [case ...]; prints median times over repeats and ratios.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnzoo as az


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def qkv(n: int, grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 8, n, 64, generator=g).requires_grad_(grad) for _ in range(3))


def case(name: str, n: int, causal: bool, backend: str, repeats: int = 3, **params: object) -> None:
    q, k, v = qkv(n)
    with torch.no_grad():
        dense = median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), repeats)
        fast = median_time(lambda: az.attention(q, k, v, causal=causal, backend=backend, **params), repeats)
    print(f"{name}: sdpa {dense:.3f}s, {backend} {fast:.3f}s, ratio {dense / fast:.1f}x", flush=True)


def case_grad(name: str, n: int, repeats: int = 3, **params: object) -> None:
    q, k, v = qkv(n, grad=True)

    def dense() -> None:
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    def fast() -> None:
        az.attention(q, k, v, backend="torch", **params).sum().backward()

    td, tf = median_time(dense, repeats), median_time(fast, repeats)
    print(f"{name}: sdpa fwd+bwd {td:.3f}s, torch fwd+bwd {tf:.3f}s, ratio {td / tf:.1f}x", flush=True)


def peak_memory(n: int, **params: object) -> None:
    import resource

    q, k, v = qkv(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        az.attention(q, k, v, backend="torch", **params)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"1-D N={n} {params}: peak RSS {after / 2**20:.2f} GiB (q,k,v = {3 * q.nbytes / 2**30:.2f} GiB; "
          f"growth {(after - before) / 2**20:.2f} GiB)", flush=True)


CASES: dict[str, Callable[[], None]] = {
    "na1d": lambda: case("1-D neighborhood N=16384 k=1023", 16384, False, "torch", method="neighborhood",
                         kernel_size=1023),
    "na1d_flex": lambda: case("1-D neighborhood N=16384 k=1023", 16384, False, "flex", method="neighborhood",
                              kernel_size=1023),
    "swa_causal": lambda: case("causal sliding window N=16384 w=1024", 16384, True, "torch",
                               method="sliding_window", window=1024),
    "na2d": lambda: case("2-D neighborhood 128x128 k=13x13", 16384, False, "torch", method="neighborhood",
                         kernel_size=13, layout=(128, 128)),
    "na2d_flex": lambda: case("2-D neighborhood 128x128 k=13x13", 16384, False, "flex", method="neighborhood",
                              kernel_size=13, layout=(128, 128)),
    "axial_rows": lambda: case("axial 128x128 rows", 16384, False, "sdpa", method="axial", layout=(128, 128), axis=1),
    "axial_cols": lambda: case("axial 128x128 columns", 16384, False, "sdpa", method="axial", layout=(128, 128),
                               axis=0),
    "axial_both": lambda: case("axial 128x128 both axes", 16384, False, "sdpa", method="axial", layout=(128, 128)),
    "grouped_docs": lambda: case("grouped, 16 packed documents of 1024, N=16384", 16384, False, "torch",
                                 method="grouped", group_ids=torch.arange(16384) // 1024),
    "halo2d": lambda: case("halo 128x128, block 8, halo 3", 16384, False, "torch", method="halo", block_size=8,
                           halo_size=3, layout=(128, 128)),
    "maxvit_block": lambda: case("maxvit_block 128x128, window 8", 16384, False, "sdpa", method="maxvit_block",
                                 window_size=8, layout=(128, 128)),
    "maxvit_grid": lambda: case("maxvit_grid 128x128, grid 8", 16384, False, "sdpa", method="maxvit_grid",
                                grid_size=8, layout=(128, 128)),
    "dilated": lambda: case("dilated N=16384, dilation 4, window 256", 16384, False, "torch", method="dilated",
                            dilation=4, window=256),
    "na1d_grad": lambda: case_grad("1-D neighborhood N=16384 k=1023", 16384, method="neighborhood", kernel_size=1023),
    "na1d_mem": lambda: peak_memory(65536, method="neighborhood", kernel_size=1023),
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(CASES):
        CASES[name]()
