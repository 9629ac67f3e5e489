from dataclasses import replace

import attnzoo
from attnzoo.bench import efficiency
from attnzoo.registry import SELF_PATTERNS, Backend, get

DIMS = {"batch": 1, "heads": 2, "kv_heads": 1, "head_dim": 8, "device": "cpu", "dtype": "float32"}


def test_rounds_run_forward_then_training_each_in_increasing_length():
    order = efficiency.rounds({"fwd": [4096, 1024, 2048], "fwd+bwd": [2048, 1024]})
    assert order == [("fwd", 1024), ("fwd", 2048), ("fwd", 4096), ("fwd+bwd", 1024), ("fwd+bwd", 2048)]


def _case(method: str, n: int, mode: str = "fwd", backend: str = "torch") -> dict:
    return {"method": method, "backend": backend, "pattern": "self/causal", "mode": mode, "length": n}


SDPA = {("softmax", "sdpa", "self/causal", "fwd"): {1024: 0.01, 2048: 0.04}}


def test_cutoff_skips_measured_quadratic_series_as_costly_as_sdpa_beyond_the_cutoff_only():
    quad = {**SDPA, ("m", "torch", "self/causal", "fwd"): {1024: 0.01, 2048: 0.04}}
    reason = efficiency.cutoff_reason(_case("m", 4096), quad, 2048, None)
    assert reason is not None and "N^2.00" in reason and "1× SDPA's time at 2048" in reason
    assert efficiency.cutoff_reason(_case("m", 2048), quad, 1024, None) is None  # one point below 2048: unknown
    assert efficiency.cutoff_reason(_case("m", 4096), quad, 4096, None) is None  # not beyond the cutoff
    linear = {**SDPA, ("m", "torch", "self/causal", "fwd"): {1024: 0.01, 2048: 0.021}}
    assert efficiency.cutoff_reason(_case("m", 4096), linear, 2048, None) is None
    cheap = {**SDPA, ("m", "torch", "self/causal", "fwd"): {1024: 0.001, 2048: 0.004}}  # quadratic at 0.1× SDPA
    assert efficiency.cutoff_reason(_case("m", 4096), cheap, 2048, None) is None
    assert efficiency.cutoff_reason(_case("softmax", 4096, backend="sdpa"), SDPA, 2048, 1e-9) is None


def test_cutoff_cap_predicts_from_the_series_or_from_the_forward():
    one = {("m", "torch", "self/causal", "fwd"): {1024: 0.1}}
    reason = efficiency.cutoff_reason(_case("m", 4096), one, None, 1.0)  # quadratic guess: 0.1 × 16
    assert reason is not None and "1.6 s" in reason and "N=1024" in reason
    assert efficiency.cutoff_reason(_case("m", 2048), one, None, 1.0) is None  # 0.4 s
    linear = {("m", "torch", "self/causal", "fwd"): {1024: 0.1, 2048: 0.2}}
    assert efficiency.cutoff_reason(_case("m", 4096), linear, None, 0.5) is None  # 0.4 s at the measured exponent
    fwd = {("m", "torch", "self/causal", "fwd"): {2048: 0.5}}
    reason = efficiency.cutoff_reason(_case("m", 2048, "fwd+bwd"), fwd, None, 1.0)
    assert reason is not None and "4 × its forward at N=2048" in reason
    shorter = {("m", "torch", "self/causal", "fwd"): {1024: 0.1}}  # 4 × 0.1 × 2² = 1.6 s
    reason = efficiency.cutoff_reason(_case("m", 2048, "fwd+bwd"), shorter, None, 1.0)
    assert reason is not None and "1.6 s" in reason and "N=1024" in reason
    assert efficiency.cutoff_reason(_case("m", 2048, "fwd+bwd"), {}, None, 1.0) is None  # nothing to predict from


def test_quiet_enough_needs_three_agreeing_repeats():
    assert not efficiency.quiet_enough([1.0, 1.0], 0.05)
    assert efficiency.quiet_enough([1.0, 1.01, 0.99], 0.05)
    assert not efficiency.quiet_enough([1.0, 1.5, 0.7], 0.05)
    assert not efficiency.quiet_enough([1.0, 1.0, 1.0], None)


def test_plan_restricts_a_mode_to_its_patterns():
    cases = efficiency.plan([get("sigmoid")], ["self/causal", "cross/causal"], {"fwd": [32], "fwd+bwd": [32]}, None,
                            {}, DIMS, {}, {"fwd+bwd": ["self/causal"]})
    assert {(c["mode"], c["pattern"]) for c in cases} == {("fwd", "self/causal"), ("fwd", "cross/causal"),
                                                          ("fwd+bwd", "self/causal")}


def test_plan_baseline_first_patterns_from_the_spec_and_skipped_backends():
    sig = get("sigmoid")
    self_only = replace(sig, spec=replace(sig.spec, name="self_only", patterns=SELF_PATTERNS),
                        backends=(*sig.backends, Backend("flex", sig.backends[0].fn)))
    cases = efficiency.plan([self_only], ["self/causal", "cross/causal"], {"fwd": [32]}, None,
                            {"flex": "not now"}, DIMS, {"repeats": 1})
    got = [(c["method"], c["backend"], c["pattern"], c.get("skip")) for c in cases]
    assert got == [("softmax", "sdpa", "self/causal", None), ("self_only", "torch", "self/causal", None),
                   ("self_only", "flex", "self/causal", "not now"), ("softmax", "sdpa", "cross/causal", None)]
    cross = next(c for c in cases if c["pattern"] == "cross/causal")
    assert (cross["seq_q"], cross["seq_kv"], cross["kv_heads"], cross["repeats"]) == (16, 32, 1, 1)


def test_pick_backend_skips_avoided_and_unable_backends():
    m = attnzoo.get("sigmoid")
    flexed = replace(m, backends=(Backend("flex", m.backends[0].fn, lambda call: None), *m.backends))
    call = efficiency.measure.make_call({**DIMS, "seq_q": 8, "seq_kv": 8}, causal=False, requires_grad=False)
    assert efficiency.pick_backend(flexed, call, ["flex"]) == "torch"
    assert efficiency.pick_backend(flexed, call, []) == "torch"  # auto's order on CPU: torch before flex
    favoured = replace(m, backends=(Backend("flex", m.backends[0].fn, priority={"cpu": 99}), *m.backends))
    assert efficiency.pick_backend(favoured, call, []) == "flex"  # a declared priority wins
    refusing = replace(m, backends=(Backend("torch", m.backends[0].fn, lambda call: "no"),))
    assert efficiency.pick_backend(refusing, call, []) == "auto"


def test_fill_flops_and_ratios():
    def row(method, backend, flops, t):
        return {"method": method, "backend": backend, "pattern": "self/causal", "mode": "fwd", "length": 64,
                "status": "ok", "flops": flops, "time_median_s": t, "peak_bytes": 100, **DIMS}

    rows = [row("softmax", "sdpa", 10, 1.0), row("m", "flex", None, 0.5), row("m", "torch", 40, 2.0)]
    efficiency.fill_flops(rows)
    efficiency.attach_ratios(rows)
    assert rows[1]["flops"] == 40 and rows[1]["flops_source"] == "as counted for the torch backend"
    assert rows[1]["gflops_per_s"] == 80 / 1e9
    assert [r["time_ratio"] for r in rows] == [1.0, 0.5, 2.0] and rows[2]["memory_ratio"] == 1.0
