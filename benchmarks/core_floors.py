"""Issue-2 performance floors: API overhead over SDPA, and sigmoid attention's time and memory at N=16384.

Run: python benchmarks/core_floors.py  (CPU, fp32, Linux). Each memory case runs in a fresh child process: once its
inputs exist, the peak-RSS mark is reset (``/proc/self/clear_refs``) and the case reports the peak resident set size
(``VmHWM``) above the resident size at that point. (``getrusage``'s ``ru_maxrss`` is not used: Linux carries the
parent's value across fork/exec.)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def median_times(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, calls interleaved so that machine load hits them alike."""
    times: dict = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str) -> None:
    import attnzoo as az

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 16384, 64, generator=g) for _ in range(3))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    base = _status_kib("VmRSS")
    with torch.no_grad():
        t = time.perf_counter()
        if method == "sdpa":
            F.scaled_dot_product_attention(q, k, v)
        else:
            az.attention(q, k, v, method=method)
        elapsed = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    print(json.dumps({"extra_gib": (peak - base) / 2**20, "seconds": elapsed}))


def main() -> None:
    import attnzoo as az

    if "--threads" in sys.argv:
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    print(f"torch threads: {torch.get_num_threads()}")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1024, 64) for _ in range(3))
    with torch.no_grad():
        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), "api": lambda: az.attention(q, k, v)}
        t = median_times(fns, 50)
    print(f"softmax N=1024 H=8: SDPA {t['sdpa'] * 1e3:.3f} ms, az.attention {t['api'] * 1e3:.3f} ms, "
          f"ratio {t['api'] / t['sdpa']:.3f}")
    q, k, v = (torch.randn(1, 4, 16384, 64) for _ in range(3))
    for causal in (False, True):
        with torch.no_grad():
            t = median_times({
                "sdpa": lambda c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c),
                "sigmoid": lambda c=causal: az.attention(q, k, v, method="sigmoid", causal=c),
            }, 3)
        print(f"sigmoid N=16384 H=4 causal={causal}: SDPA softmax {t['sdpa']:.3f} s, sigmoid {t['sigmoid']:.3f} s, "
              f"ratio {t['sigmoid'] / t['sdpa']:.2f}x SDPA's time")
    for method in ("sdpa", "sigmoid", "softmax"):
        out = subprocess.run([sys.executable, __file__, "--child", method], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        print(f"peak memory above inputs, {method} N=16384 H=4: {r['extra_gib']:.3f} GiB ({r['seconds']:.2f} s)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
