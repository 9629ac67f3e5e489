"""Suite ``layers``: the Aaren cases carry the issue's floor, are part of ``floors``, and a tiny run of each gives a
row."""

import dataclasses

from attnzoo.bench import suites
from attnzoo.bench.suites import at_most, runner

TINY = {"n": 64, "heads": 2, "head_dim": 8, "rounds": 1, "threads": 1}


def test_cases_carry_the_issue_floor():
    cases = {c.name: c for c in suites.suites()["layers"]}
    assert set(cases) == {"aaren_scale", "aaren_scale_grad", "aaren_sdpa", "aaren_memory", "aaren_decode"}
    scale = cases["aaren_scale"]
    assert (scale.n, scale.n2, scale.causal, scale.backward) == (8192, 65536, True, False)
    assert scale.floors == {"scaling": at_most(10)} and scale.target.method == "aaren"
    assert all(c in suites.suites()["floors"] for c in cases.values() if c.floors)


def test_a_tiny_run_of_every_timed_case_gives_a_row():
    for case in suites.suites()["layers"]:
        if case.measure == "memory":  # a fresh interpreter per call: covered by the memory measure's own tests
            continue
        tiny = dataclasses.replace(case, **TINY, n2=128 if case.n2 else None)
        row = runner.run_case(tiny, suite="layers")
        assert row["status"] == "ok", row
        assert row["metrics"][case.metric] > 0
