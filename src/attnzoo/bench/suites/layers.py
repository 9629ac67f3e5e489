"""Suite ``layers`` (issue 15, the S-family attention layers): S12 Aaren's prefix scan. Causal, B=1 H=8 D=64, fp32.

- ``aaren_scale``: the scan's forward, time(N=65536) / time(N=8192); floor ≤ 10 (linear in N: ideal 8);
- ``aaren_scale_grad``: the same with the backward (no floor);
- ``aaren_sdpa``: the scan's forward at N=16384 against causal SDPA (softmax attention of N queries over their
  prefixes, what a Transformer layer computes; no floor: different work, shown for scale);
- ``aaren_memory``: peak memory above the inputs of the scan's forward at N=65536 in a fresh process (no floor:
  O(N·(C + Dv)), the chunk weights and the prefix states);
- ``aaren_decode``: one recurrent step after 1k and after 64k prefilled tokens (one thread): the state is the
  constant-size triple, so ``step_ratio`` ≤ 1.25 and ``bytes_ratio`` = 1.

The inputs are the suite's ``randn`` ``(q, k, v)``: a query per position, which the method scores against its own
key (an Aaren layer's learned query is the same at every position; the scan's cost does not depend on that).
"""

from __future__ import annotations

from attnzoo.bench.suites import Case, Target, at_most

AAREN = Target("aaren (torch scan)", "aaren", "torch")

CASES = (
    Case("aaren_scale", "aaren prefix-scan causal forward, time(N=65536) / time(N=8192) (ideal 8)", "scaling", AAREN,
         against=None, n=8192, n2=65536, causal=True, metric="scaling", floors={"scaling": at_most(10)}, rounds=6),
    Case("aaren_scale_grad", "aaren prefix-scan causal forward+backward, time(N=65536) / time(N=8192) (ideal 8)",
         "scaling", AAREN, against=None, n=8192, n2=65536, causal=True, backward=True, metric="scaling", rounds=4),
    Case("aaren_sdpa", "aaren prefix-scan causal forward N=16384 vs causal SDPA", "compare", AAREN, n=16384,
         causal=True, rounds=3),
    Case("aaren_memory", "peak memory above the inputs, aaren prefix-scan causal forward N=65536 (fresh process)",
         "memory", AAREN, against=None, n=65536, causal=True, metric="peak_gib"),
    Case("aaren_decode", "aaren decode step after 1k vs after 64k prefilled tokens (one thread)", "decode",
         Target("aaren", "aaren"), against=None, n=1024, n2=65536, causal=True, metric="step_ratio",
         floors={"step_ratio": at_most(1.25), "bytes_ratio": at_most(1.0)}, rounds=9, threads=1),
)
