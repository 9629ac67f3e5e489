"""Suite ``inference``: its cases are the issue's shapes and floors, every workload computes what its case says (at
tiny sizes), and a tiny run of each case gives a row."""

import dataclasses

import pytest
import torch

from attnzoo.bench import suites
from attnzoo.bench.suites import at_least, at_most, inference, runner

TINY = {"batch": 4, "n": 32, "heads": 2, "head_dim": 8, "rounds": 1, "threads": 1}


def _case(name):
    return next(c for c in suites.suites()["inference"] if c.name == name)


def test_cases_are_the_issue_shapes_and_floors():
    cases = {c.name: c for c in suites.suites()["inference"]}
    assert set(cases) == {"hydragen_64x8192", "hydragen_8x1024", "hydragen_64x256", "hydragen_tree",
                          "merge_halves_4k", "mac_decode_hit", "mac_decode_miss"}
    big = cases["hydragen_64x8192"]
    assert (big.batch, big.n, big.heads, big.head_dim, inference.SUFFIX) == (64, 8192, 8, 64, 128)
    assert big.floors == {"speedup": at_least(10)} and big.against.workload is inference.full_cache_sdpa_call
    assert "auto takes the shared path" in big.what
    assert cases["hydragen_tree"].floors == {"speedup": at_least(1.5)}
    assert cases["merge_halves_4k"].floors == {"time_ratio": at_most(1.1)} and cases["merge_halves_4k"].n == 4096
    assert not cases["mac_decode_hit"].floors and not cases["mac_decode_miss"].floors
    assert all(c in suites.suites()["floors"] for c in cases.values() if c.floors)


def test_hydragen_and_tree_workloads_compute_the_same_attention_as_their_baselines():
    case = dataclasses.replace(_case("hydragen_tree"), **TINY)
    with torch.no_grad():
        torch.testing.assert_close(inference.shared_prefix_call(case, "cpu")(),
                                   inference.full_cache_sdpa_call(case, "cpu")(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inference.tree_call(case, "cpu")(), inference.one_level_call(case, "cpu")(),
                                   atol=1e-5, rtol=1e-5)


def test_merge_workload_gives_attention_over_all_keys():
    case = dataclasses.replace(_case("merge_halves_4k"), **TINY)
    out = inference.halves_merged_call(case, "cpu")()
    q, k, v = runner.inputs(case, case.n, "cpu", False)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("threshold", "hit_rate"), [(0.95, 1.0), (1.5, 0.0)])
def test_mac_workloads_hit_always_or_never(threshold, hit_rate):
    case = dataclasses.replace(_case("mac_decode_hit"), **TINY)
    state, token = inference.mac_state(case, "cpu", threshold)
    with torch.no_grad():
        for _ in range(3):
            inference.mac_step(state, *token)
    assert state.hit_rate == hit_rate


def test_a_tiny_run_of_every_case_gives_a_row():
    for case in suites.suites()["inference"]:
        row = runner.run_case(dataclasses.replace(case, **TINY), suite="inference")
        assert row["status"] == "ok", row
        assert row["metrics"]["speedup"] > 0 and row["passed"] in (True, False, None)
        assert row["method"] == case.target.workload.__name__
