"""Suite ``decode``: decoding through KV caches and presses (issue 10's floors).

- ``softmax_decode_32k``: a softmax decode step (``attnzoo.step`` appending to a :class:`~attnzoo.kv.cache.KVCache`)
  at context 32768 against SDPA of one query over the same keys: within 1.1× its time;
- ``<press>_decode_32k``: the same step after a scoring press at compression ratio 0.5, against the full cache: cache
  bytes ≤ 0.55× and step time ≤ 0.6× (also with AdaKV's per-head budgets, whose ragged cache really holds only the
  kept tokens);
- ``sliding_window_decode``: window 1024, step time and state bytes after 4096 vs after 65536 tokens (a ring of the
  window: independent of context, ±10 %);
- ``rotatekv_bytes`` / ``matryoshka_bytes``: cache bytes over an fp16 cache of the same tokens (2 bits, group 128:
  ≤ 0.16×; half rank, coordinates stored in fp16: ≤ 0.52×).
"""

from __future__ import annotations

import torch

from attnzoo.bench.suites import Case, Target, at_most
from attnzoo.kv.presses import KnormPress

SOFTMAX = Target("softmax decode", "softmax")
PRESSES = ("KnormPress", "SnapKVPress", "StreamingLLMPress")

CASES = (
    Case("softmax_decode_32k", "softmax decode step at context 32768 vs SDPA of one query over the same keys",
         "cache_step", SOFTMAX, n=32768, causal=True, metric="time_ratio", floors={"time_ratio": at_most(1.1)},
         rounds=7),
    *(Case(f"{p.removesuffix('Press').lower()}_decode_32k",
           f"decode step at context 32768 after {p}(compression_ratio=0.5) vs the full cache", "cache_step",
           Target(f"{p} 0.5", "softmax", press=p, press_params={"compression_ratio": 0.5}), against=SOFTMAX,
           n=32768, causal=True, metric="time_ratio",
           floors={"time_ratio": at_most(0.6), "bytes_ratio": at_most(0.55)}, rounds=7) for p in PRESSES),
    Case("adakv_decode_32k", "decode step at context 32768 after AdaKVPress(KnormPress(0.5)) (per-head budgets, a "
         "ragged paged cache) vs the full cache", "cache_step",
         Target("AdaKV(Knorm) 0.5", "softmax", press="AdaKVPress",
                press_params={"press": KnormPress(compression_ratio=0.5)}),
         against=SOFTMAX, n=32768, causal=True, metric="time_ratio",
         floors={"time_ratio": at_most(0.6), "bytes_ratio": at_most(0.55)}, rounds=7),
    Case("sliding_window_decode", "sliding_window (window 1024, a ring of 1025 slots) decode step after 4096 vs after "
         "65536 tokens (one thread)",
         "decode", Target("sliding_window", "sliding_window", params={"window": 1024}), against=None, n=4096,
         n2=65536, causal=True, metric="step_ratio",
         floors={"step_ratio": at_most(1.1), "bytes_ratio": at_most(1.1)}, rounds=9, threads=1),
    Case("rotatekv_bytes", "RotateKV 2-bit (group 128) cache bytes vs the fp16 cache, context 4096, head dim 128",
         "cache_bytes", Target("RotateKV 2-bit", "softmax", press="RotateKVPress", press_params={"bits": 2}),
         against=None, n=4096, head_dim=128, causal=True, metric="bytes_ratio",
         floors={"bytes_ratio": at_most(0.16)}),
    Case("matryoshka_bytes", "MatryoshkaKV at half rank: cache bytes vs the fp16 cache, context 4096, head dim 128",
         "cache_bytes", Target("MatryoshkaKV rank 64", "softmax", press="MatryoshkaKVPress",
                               press_params={"rank": 64, "dtype": torch.float16}),
         against=None, n=4096, head_dim=128, causal=True, metric="bytes_ratio",
         floors={"bytes_ratio": at_most(0.52)}),
)
