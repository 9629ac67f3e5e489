import json

import pytest

from attnzoo.bench import compare, report
from attnzoo.bench import results as schema
from attnzoo.errors import AttnzooError


def row(method, backend, length, t, mem, pattern="self/causal", mode="fwd", status="ok"):
    return {"kind": "efficiency", "method": method, "backend": backend, "pattern": pattern, "mode": mode,
            "length": length, "seq_q": length, "seq_kv": length, "batch": 1, "heads": 2, "kv_heads": 2, "head_dim": 8,
            "device": "cpu", "dtype": "float32", "status": status, "reason": "" if status == "ok" else "why",
            "time_median_s": t, "time_iqr_s": 0.0, "peak_bytes": mem, "flops": 10, "gflops_per_s": 1.0,
            "time_ratio": None, "memory_ratio": None}


def results(scale=1.0):
    eff = []
    for n in (256, 512, 1024, 2048):
        eff.append(row("softmax", "sdpa", n, 1e-9 * n * n, 100 * n))
        eff.append(row("linear", "torch", n, scale * 1e-6 * n, 20_000 * n))
    eff.append(row("broken", "torch", 256, None, None, status="error"))
    return {"schema": schema.SCHEMA, "status": "complete", "created": "now", "finished": "now", "wall_s": 1.0,
            "command": "attnzoo bench", "machine": {"torch": "x"}, "config": {"batch": 1}, "memory_method": "m",
            "efficiency": eff, "efficiency_length": [], "approximation": [], "quality": [
                {"method": m, "task": {"name": "mqar", "pairs": p}, "dim": 32, "status": "ok",
                 "accuracy": min(1.0, 2 / p * scale), "chance": 0.1, "final_loss": 1.0, "train_time_s": 1.0}
                for m in ("softmax", "linear") for p in (4, 8)]}


def test_round_trip_and_efficiency_lengths(tmp_path):
    res = results()
    report.write_report(res, tmp_path)
    back = schema.load_results(tmp_path / "results.json")
    assert back["schema"] == schema.SCHEMA
    assert back["efficiency"] == json.loads(json.dumps(res["efficiency"]))
    by_metric = {e["metric"]: e for e in back["efficiency_length"] if e["method"] == "linear"}
    assert by_metric["time"]["kind"] == "crossing" and by_metric["time"]["length"] == pytest.approx(1000)
    assert by_metric["memory"]["kind"] == "never"  # 200× the memory, same growth
    summary = (tmp_path / "summary.md").read_text()
    assert "| linear | torch | self/causal | 2048 |" in summary
    assert "| broken | torch fwd | self/causal | error | 256 | why |" in summary
    assert "| mqar (pairs=8) | 32 | linear | 0.250 |" in summary
    for name in ("time_fwd.png", "memory_fwd.png", "ratio_fwd.png", "quality.png", "mqar.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "a JSON file"),
        (json.dumps({"schema": "something/1"}), "schema 'attnzoo.bench/1.5'"),
        (json.dumps({"schema": "attnzoo.bench/2"}), "schema version 1.x"),
        (json.dumps({"schema": "attnzoo.bench/1", "efficiency": {}}), "a list under 'efficiency'"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(AttnzooError, match="results") as e:
        schema.load_results(path)
    assert message in str(e.value)


def test_saved_results_are_strict_json(tmp_path):
    res = results()
    res["efficiency"][0]["time_median_s"] = float("nan")
    res["efficiency"][1]["peak_bytes"] = float("inf")
    schema.save_results(tmp_path / "r.json", res)
    back = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert back["efficiency"][0]["time_median_s"] is None and back["efficiency"][1]["peak_bytes"] is None


def test_load_accepts_a_minor_version(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": "attnzoo.bench/1.3", "efficiency": []}))
    assert schema.load_results(path)["quality"] == []


def test_compare_reports_faster_slower_and_status(tmp_path):
    a, b = results(), results(scale=2.0)
    b["efficiency"][-1]["status"] = "ok"
    b["efficiency"][-1].update(time_median_s=1.0)
    b["efficiency"].append(row("new", "torch", 256, 1.0, 1))
    for name, res in (("a.json", a), ("b.json", b)):
        schema.save_results(tmp_path / name, res)
    changes = compare.compare(schema.load_results(tmp_path / "a.json"), schema.load_results(tmp_path / "b.json"))
    assert {c["case"][0] for c in changes["slower"]} == {"linear"}
    assert all(c["ratio"] == pytest.approx(2.0) for c in changes["slower"])
    assert changes["faster"] == [] and len(changes["only_b"]) == 1
    assert [(c["a"], c["b"]) for c in changes["status"]] == [("error", "ok")]
    assert changes["quality"][0]["ratio"] == pytest.approx(0.5)  # linear and softmax at 4 pairs: 0.5 → 1.0
    text = compare.main(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert "## Slower (4)" in text and "2.00×" in text


def test_a_hundred_method_report_stays_one_file_under_5_mb(tmp_path):
    """The size budget of issue 16, at the scale the registry is heading for: a hundred methods (the registered ones
    plus unknown names), four patterns, the quick run's lengths, quality and approximation rows."""
    import attnzoo

    names = list(attnzoo.methods()) + [f"extra_{i}" for i in range(100 - len(attnzoo.methods()))]
    patterns = ("self/noncausal", "self/causal", "cross/noncausal", "cross/causal")
    eff = []
    for pattern in patterns:
        for mode, lengths in (("fwd", (512, 1024, 2048, 4096)), ("fwd+bwd", (2048,))):
            for n in lengths:
                for i, name in enumerate(["softmax"] + [m for m in names if m != "softmax"]):
                    power = 2.0 if i % 3 == 0 else 1.0 + i % 7 / 10
                    eff.append(row(name, "sdpa" if name == "softmax" else "torch", n, 1e-6 * n**power / (1 + i),
                                   1000 * n * (1 + i % 5), pattern=pattern, mode=mode))
    res = {**results(), "efficiency": eff,
           "approximation": [{"method": m, "backend": "torch", "pattern": "self/noncausal", "setting": {},
                              "status": "ok", "rel_l2": 0.01 * (i % 50)} for i, m in enumerate(names)],
           "quality": [{"method": m, "task": {"name": "mqar", "pairs": 4, "vocab": 16}, "dim": 32, "status": "ok",
                        "accuracy": (i % 10) / 10, "chance": 0.125, "final_loss": 1.0, "train_time_s": 1.0}
                       for i, m in enumerate(names)]}
    report.write_report(res, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert page.count("<tr") > 400 and names[-1] in page
    assert (tmp_path / "report.html").stat().st_size < 5 * 10**6
