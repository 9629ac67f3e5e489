"""Named suites: their planning (names, floors, selection), the fresh-process probe, suite rows and their tables."""

import argparse
import importlib.util
import json

import pytest

import attnzoo
from attnzoo.bench import add_arguments, efficiency, fresh, main, suites
from attnzoo.bench.efficiency import attach_fresh
from attnzoo.bench.report import summary_markdown
from attnzoo.bench.suites import Case, Floor, Target, at_least, at_most, below, runner, structured
from attnzoo.bench.tables import md_table, suite_table
from attnzoo.errors import AttnzooError

DIMS = {"batch": 1, "heads": 4, "kv_heads": 4, "head_dim": 32, "device": "cpu", "dtype": "float32"}


def test_case_names_are_unique_and_floors_collects_every_floored_case():
    named = suites.suites()
    names = [c.name for suite, cases in named.items() if suite != "floors" for c in cases]
    assert len(names) == len(set(names))
    assert [c.name for c in named["floors"]] == [n for n in names if suites.find(n).floors]
    assert {"api_overhead", "sigmoid_h8_fresh", "na1d", "linear_scale", "linear_decode", "fla_linear"} <= set(
        c.name for c in named["floors"])


def test_every_case_targets_a_registered_method_backend_and_parameters():
    for case in (c for cases in suites.suites().values() for c in cases):
        for target in (case.target, case.against):
            if target is None or target.method is None:
                continue
            spec = attnzoo.get(target.method).spec
            assert target.backend == "auto" or target.backend in spec.backends, (case.name, target.backend)
            for name in target.params:
                spec.param(name)  # raises KeyError for a parameter the method does not have


def test_the_sigmoid_fresh_case_is_as_the_issue_asks():
    case = suites.find("sigmoid_h8_fresh")
    assert (case.measure, case.target.method, case.heads, case.n, case.batch, case.head_dim) == (
        "fresh", "sigmoid", 8, 16384, 1, 64)
    assert case.floors["time_ratio"] == at_most(1.3) and "peak_gib" in case.floors


def test_select_by_pattern_and_errors_name_the_option():
    assert [c.name for c in suites.select("core", ["sigmoid_h4*"])] == [
        "sigmoid_h4", "sigmoid_h4_causal", "sigmoid_h4_memory"]
    with pytest.raises(AttnzooError, match="--suite"):
        suites.select("nope")
    with pytest.raises(AttnzooError, match="--cases"):
        suites.select("core", ["na1d"])
    assert "api_overhead" in suites.listing() and "floors (" in suites.listing()


def test_floors():
    assert at_most(1.3).holds(1.3) and not at_most(1.3).holds(1.31)
    assert at_least(6).holds(6.5) and not below(1.0).holds(1.0)
    assert below(1).text("peak_gib") == "< 1 GiB" and at_least(6).text("speedup") == "≥ 6×"
    with pytest.raises(ValueError, match="floor op"):
        Floor("==", 1)
    with pytest.raises(ValueError, match="needs n2"):
        Case("x", "x", "scaling", Target("t", "linear"))


def test_fresh_probe_of_a_small_case_returns_a_positive_peak():
    case = {"kind": "efficiency", "method": "sigmoid", "backend": "torch", "pattern": "self/noncausal", "mode": "fwd",
            **efficiency.shape("self/noncausal", 512, **DIMS), "seed": 0, "calls": 2}
    got = fresh.probe(case, timeout_s=120)
    assert got["status"] == "ok", got
    assert 0 < got["fresh_peak_bytes"] < 2**30
    assert len(got["times_s"]) == 2 and all(t > 0 for t in got["times_s"])


def test_fresh_plan_covers_subquadratic_methods_and_attaches_beside_the_warm_row():
    methods = [attnzoo.get(n) for n in ("softmax", "sigmoid", "linear")]
    cases = fresh.plan(methods, ["self/causal"], 64, DIMS, ["flex"], {"seed": 0})
    assert [(c["method"], c["backend"], c["pattern"], c["length"]) for c in cases] == [
        ("softmax", "sdpa", "self/causal", 64), ("sigmoid", "torch", "self/causal", 64),
        ("linear", "torch", "self/causal", 64)]
    warm = [{**c, "kind": "efficiency", "status": "ok"} for c in cases]
    attach_fresh(warm, [{**cases[1], "status": "ok", "fresh_peak_bytes": 123}])
    assert [r.get("fresh_peak_bytes") for r in warm] == [None, 123, None]


def test_small_cases_run_and_check_their_floors():
    compare = Case("tiny_compare", "grouped vs SDPA", "compare",
                   Target("grouped", "grouped", "torch", tensors=structured.documents_of_1024), n=64, heads=2,
                   head_dim=8, floors={"speedup": at_least(1e-9)}, rounds=1)
    scaling = Case("tiny_scaling", "linear scaling", "scaling", Target("linear", "linear"), against=None, n=32,
                   n2=64, heads=2, head_dim=8, causal=True, backward=True, metric="scaling", rounds=1)
    decode = Case("tiny_decode", "lightning decode", "decode", Target("lightning", "lightning"), against=None, n=16,
                  n2=64, heads=2, head_dim=8, causal=True, metric="step_ratio", floors={"step_ratio": below(1e9)},
                  rounds=1)
    rows = [runner.run_case(c, suite="test") for c in (compare, scaling, decode)]
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    assert rows[0]["passed"] is True and rows[0]["metrics"]["speedup"] > 0
    assert rows[1]["passed"] is None and rows[1]["metrics"]["scaling"] > 0
    assert rows[2]["passed"] is True and "µs" in rows[2]["details"]
    failing = runner.run_case(Case("tiny_bad", "bad", "compare", Target("bad", "sigmoid", "nope"), n=16), suite="t")
    assert failing["status"] == "unsupported" and "backend" in failing["reason"]


def test_suite_table_and_markdown():
    rows = [
        {"suite": "core", "case": "a", "what": "A | B", "status": "ok", "measured_text": "1.20×",
         "floor_text": "≤ 1.3×", "passed": True, "details": "x"},
        {"suite": "core", "case": "b", "what": "B", "status": "ok", "measured_text": "2 GiB", "floor_text": "< 1 GiB",
         "passed": False, "details": ""},
        {"suite": "linear", "case": "c", "what": "C", "status": "skipped", "floor_text": "≥ 1×",
         "reason": "no fla"},
    ]
    header, body = suite_table({"suites": rows})
    assert [b[5] for b in body] == ["pass", "FAIL", "skipped"] and body[2][6] == "no fla"
    text = md_table(header, body)
    assert "| core | a | A \\| B | 1.20× | ≤ 1.3× | pass | x |" in text
    assert md_table(header, []) == "_nothing measured_\n"
    summary = summary_markdown({"suites": rows, "efficiency": [], "status": "complete"})
    assert "## Suite cases (each measured against its floor)" in summary


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_lists_suites_and_refuses_cases_without_a_suite(tmp_path, capsys):
    assert main(_parse(["--suite", "list"])) == 0
    assert "sigmoid_h8_fresh" in capsys.readouterr().out
    assert main(_parse(["--cases", "na1d", "--out", str(tmp_path)])) == 2
    assert "--cases" in capsys.readouterr().err
    assert main(_parse(["--suite", "nope", "--out", str(tmp_path)])) == 2


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="fla installed: the case would run for real")
def test_a_case_whose_peer_package_is_missing_is_skipped(tmp_path):
    assert main(_parse(["--suite", "floors", "--cases", "fla_linear", "--out", str(tmp_path)])) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["case"], r["status"]) for r in saved["suites"]] == [("fla_linear", "skipped")]
    assert "'fla' is not installed" in saved["suites"][0]["reason"]
    assert "fla_linear" in (tmp_path / "summary.md").read_text()
