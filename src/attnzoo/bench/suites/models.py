"""Suite ``transformers``: attnzoo methods inside a transformers model (issue 11's performance figures).

- ``hf_softmax_2048``: a tiny Llama's prefill of 2048 tokens with ``attn_implementation="attnzoo_softmax"`` against
  the same model with ``sdpa``: the integration's overhead, within 1.05×;
- ``hf_sliding_window_8192``: the same model with ``sliding_window`` (window 256) at 8192 tokens, where the method is
  faster than SDPA in ``attnzoo bench``: the model's prefill is faster too (speed-up ≥ 1).
"""

from __future__ import annotations

from attnzoo.bench.suites import Case, Target, at_least, at_most

SDPA_MODEL = Target("tiny Llama, sdpa")

CASES = (
    Case("hf_softmax_2048", "tiny Llama prefill of 2048 tokens: attnzoo_softmax vs the model's sdpa (one thread)",
         "model", Target("tiny Llama, attnzoo_softmax", "softmax"), against=SDPA_MODEL, n=2048, heads=4,
         metric="time_ratio", floors={"time_ratio": at_most(1.05)}, rounds=15, threads=1, requires="transformers"),
    Case("hf_sliding_window_8192", "tiny Llama prefill of 8192 tokens: attnzoo_sliding_window (window 256) vs sdpa "
         "(one thread)", "model",
         Target("tiny Llama, attnzoo_sliding_window", "sliding_window", params={"window": 256}),
         against=SDPA_MODEL, n=8192, heads=4, metric="speedup", floors={"speedup": at_least(1.0)}, rounds=5, threads=1,
         requires="transformers"),
)
