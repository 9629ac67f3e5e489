"""Suite ``core`` (issue 2): the API's overhead over SDPA, and sigmoid attention's time and memory at N=16384."""

from __future__ import annotations

from attnzoo.bench.suites import Case, Target, at_most, below

SIGMOID = Target("sigmoid (torch)", "sigmoid", "torch")

CASES = (
    Case("api_overhead", "az.attention(method='softmax') vs SDPA called directly, B=1 H=8 N=1024 D=64", "compare",
         Target("az.attention softmax", "softmax"), n=1024, metric="time_ratio",
         floors={"time_ratio": at_most(1.05)}, rounds=50),
    Case("sigmoid_h4", "sigmoid (torch path) vs SDPA, B=1 H=4 N=16384 D=64", "compare", SIGMOID, heads=4,
         metric="time_ratio", floors={"time_ratio": at_most(2.0)}),
    Case("sigmoid_h4_causal", "sigmoid causal vs causal SDPA, B=1 H=4 N=16384 D=64", "compare", SIGMOID, heads=4,
         causal=True, metric="time_ratio"),
    Case("sigmoid_h4_memory", "peak memory above the inputs, sigmoid (fresh process), H=4 N=16384; SDPA beside",
         "memory", SIGMOID, heads=4, metric="peak_gib", floors={"peak_gib": below(1.0)}),
    Case("softmax_h4_memory", "peak memory above the inputs, softmax through attnzoo (fresh process), H=4 N=16384",
         "memory", Target("az.attention softmax", "softmax"), against=None, heads=4, metric="peak_gib"),
    Case("sigmoid_h8_fresh", "sigmoid forward vs SDPA, B=1 H=8 N=16384 D=64, each call in a fresh process",
         "fresh", SIGMOID, heads=8, metric="time_ratio", floors={"time_ratio": at_most(1.3), "peak_gib": below(1.0)},
         rounds=2),
)
