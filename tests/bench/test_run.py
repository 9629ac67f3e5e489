import argparse
import json
import os
from pathlib import Path

import attnzoo
from attnzoo.bench import add_arguments, approx, main, sweep
from attnzoo.bench.worker import Runner
from attnzoo.registry import Param

from . import fakes

ROOT = Path(__file__).resolve().parents[2]


def tiny(methods, **overrides):
    cfg = sweep.quick_config(methods=methods, patterns=["self/causal", "cross/noncausal"], lengths=[16, 32],
                             bwd_lengths=[16], bwd_patterns=None, heads=2, head_dim=8, repeats=2, budget_s=0.05,
                             isolate=False,
                             phases=["efficiency", "approximation"])
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def statuses(results, method):
    return {(r["pattern"], r["mode"], r["length"]): r for r in results["efficiency"] if r["method"] == method}


def test_a_method_that_raises_is_recorded_and_the_run_goes_on(tmp_path):
    with fakes.registered("test_raising", fakes.raising):
        results = sweep.run(tiny(["test_raising", "sigmoid"]), tmp_path, progress=False)
    assert results["status"] == "complete"
    bad = statuses(results, "test_raising")
    assert len(bad) == 6 and all(r["status"] == "error" for r in bad.values())
    assert all("RuntimeError: kaboom from the fake method" in r["reason"] for r in bad.values())
    good = statuses(results, "sigmoid")
    assert all(r["status"] == "ok" and r["time_ratio"] > 0 and r["peak_bytes"] is not None for r in good.values())
    assert all(r["flops"] > 0 for r in good.values())
    base = statuses(results, "softmax")
    assert all(r["time_ratio"] == 1.0 and r["flops_source"] == "analytic" for r in base.values())
    # rows are kept as they come, one JSON line each
    lines = [json.loads(x) for x in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert len([x for x in lines if x["section"] == "efficiency"]) == len(results["efficiency"])
    approx_rows = {r["method"]: r for r in results["approximation"]}
    assert approx_rows["test_raising"]["status"] == "error" and approx_rows["sigmoid"]["rel_l2"] > 0
    assert "kaboom" in (tmp_path / "summary.md").read_text()


def test_ctrl_c_keeps_what_was_measured(tmp_path):
    with fakes.registered("test_interrupting", fakes.interrupting):
        results = sweep.run(tiny(["test_interrupting"]), tmp_path, progress=False)
    assert results["status"] == "interrupted"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "interrupted"
    # the baseline ran before the interrupting method at the first shape
    assert [(r["method"], r["status"]) for r in saved["efficiency"]] == [("softmax", "ok")]
    assert (tmp_path / "summary.md").exists() and (tmp_path / "report.html").exists()


def test_approximate_methods_get_error_against_softmax(tmp_path):
    window = Param("window", (int,), 4, "keys within this distance", low=0)
    with fakes.registered("test_local", fakes.local_reference, exact=False, params=(window,)):
        assert approx.settings(attnzoo.get("test_local")) == [{}, {"window": 2}, {"window": 8}]
        cfg = tiny(["test_local"], phases=["approximation"], approx_length=32)
        results = sweep.run(cfg, tmp_path, progress=False)
    rows = {(r["pattern"], json.dumps(r["setting"])): r for r in results["approximation"]}
    assert len(rows) == 4  # defaults on two patterns, two more settings on the first
    assert all(r["status"] == "ok" for r in rows.values())
    default = rows[("self/causal", "{}")]
    assert default["rel_l2"] > 0.1
    # causal with window 4 keeps at most 5 keys per query out of up to 32
    assert 0 < default["density"] < 0.4 and 0 < default["mass_recall"] < 1
    wider = rows[("self/causal", json.dumps({"window": 8}))]
    assert wider["rel_l2"] < default["rel_l2"] and wider["mass_recall"] > default["mass_recall"]


def test_a_crashing_worker_is_recorded_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cfg = tiny(["softmax"], patterns=["self/causal"], lengths=[16], bwd_lengths=[], isolate=True,
               imports=["tests.bench.fakes_plugin"])
    # the plugin's method is registered in the worker only: its case is the baseline's with another method name
    case = sweep.plan_all(cfg)["efficiency"][0]
    with Runner(isolate=True, imports=cfg.imports, case_timeout_s=60) as runner:
        dead = runner.run({**case, "method": "test_crashing", "backend": "torch"})
        alive = runner.run(case)
    assert dead["status"] == "crashed" and "SIGKILL" in dead["reason"]
    assert alive["status"] == "ok"


def test_quick_smoke_two_methods(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--quick", "--methods", "softmax,sigmoid", "--lengths", "32,64", "--patterns",
                              "self/causal,cross/noncausal", "--steps", "5", "--no-progress", "--out", str(tmp_path)])
    assert main(args) == 0
    for name in ("results.json", "summary.md", "report.html", "time_fwd.png", "memory_fwd.png", "ratio_fwd.png",
                 "ratio_fwdbwd.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "complete"
    assert {(r["method"], r["status"]) for r in results["efficiency"]} == {("softmax", "ok"), ("sigmoid", "ok")}
    assert {r["length"] for r in results["efficiency"] if r["mode"] == "fwd+bwd"} == {32}
    # --patterns names the patterns of both modes (quick mode trains only self-attention by default)
    assert {r["pattern"] for r in results["efficiency"] if r["mode"] == "fwd+bwd"} == {"self/causal", "cross/noncausal"}
    assert {r["method"] for r in results["quality"]} == {"softmax", "sigmoid"}
    # sigmoid promises sub-quadratic memory: one fresh-process case beside SDPA's, at the longest forward length
    fresh = {r["method"]: r for r in results["fresh_memory"]}
    assert set(fresh) == {"softmax", "sigmoid"} and fresh["sigmoid"]["length"] == 64
    assert all(r["status"] == "ok" and r["fresh_peak_bytes"] >= 0 for r in fresh.values())
    warm = next(r for r in results["efficiency"] if r["method"] == "sigmoid" and r["length"] == 64
                and r["pattern"] == "self/causal" and r["mode"] == "fwd")
    assert warm["fresh_peak_bytes"] == fresh["sigmoid"]["fresh_peak_bytes"]
    if hasattr(attnzoo.nn, "Attention"):
        assert all(r["status"] == "ok" for r in results["quality"])
        assert (tmp_path / "quality.png").exists()
    page = (tmp_path / "report.html").read_text()
    # the interactive figures with plotly installed (the dev extra has it) in place of the curve PNGs; bar charts stay
    assert page.count("az-figure") >= 2 and "<table" in page and "alt='ratio_fwd'" in page
    assert ("Plotly" in page) != ("alt='time_fwd'" in page)
    summary = (tmp_path / "summary.md").read_text()
    assert "## Efficiency, fwd (each at its longest measured N)" in summary and "eff. length (time)" in summary
    assert "| softmax | sdpa | self/causal | 64 |" in summary


def test_bad_options_give_clear_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv, needle in ((["--methods", "softmaxx"], "did you mean 'softmax'"),
                         (["--patterns", "self/sideways"], "patterns"), (["--modes", "bwd"], "--modes")):
        assert main(parser.parse_args([*argv, "--out", str(tmp_path), "--no-progress"])) == 2
        assert needle in capsys.readouterr().err
