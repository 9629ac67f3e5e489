from dataclasses import replace

import attnzoo
from attnzoo.bench import efficiency
from attnzoo.registry import SELF_PATTERNS, Backend, get

DIMS = {"batch": 1, "heads": 2, "kv_heads": 1, "head_dim": 8, "device": "cpu", "dtype": "float32"}


def test_rounds_put_two_far_apart_lengths_and_training_first():
    order = efficiency.rounds({"fwd": [512, 256, 1024], "fwd+bwd": [512]})
    assert order == [("fwd", 256), ("fwd+bwd", 512), ("fwd", 1024), ("fwd", 512)]


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
