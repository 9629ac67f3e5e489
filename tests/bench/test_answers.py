"""The answers a report opens with: fastest methods per pattern, family efficiency lengths, grouped failures."""

import pytest

from attnzoo.bench import answers as az
from tests.bench.sample_results import FLEX_SKIP, completed


@pytest.fixture(scope="module")
def res():
    return completed()


def test_headlines_rank_the_fastest_at_the_longest_length(res):
    heads = {(h.pattern, h.mode): h for h in az.headlines(res)}
    assert set(heads) == {(p, m) for p in ("self/noncausal", "self/causal") for m in ("fwd", "fwd+bwd")}
    h = heads[("self/noncausal", "fwd")]
    assert h.length == 1024 and h.baseline_time_s == pytest.approx(4e-9 * 1024**2)
    assert [c.method for c in h.fastest] == ["linear", "sliding_window", "moba"]
    assert h.measured == 3 and h.faster == 2  # moba is slower than SDPA
    linear = h.fastest[0]
    assert linear.speedup == pytest.approx(4e-9 * 1024 / 1.5e-6) and linear.faster
    assert linear.family == "linear" and linear.exact is True and linear.error == pytest.approx(1.2)
    assert linear.accuracy == pytest.approx(0.4) and linear.memory_ratio == pytest.approx(1 / linear.speedup)
    causal = heads[("self/causal", "fwd")]
    assert [c.method for c in causal.fastest] == ["lightning", "linear", "sliding_window"]
    assert heads[("self/causal", "fwd+bwd")].length == 512


def test_headlines_count_methods_stopped_at_shorter_lengths(res):
    cut = {**res, "efficiency": [r for r in res["efficiency"] if not (
        r["method"] == "moba" and r["pattern"] == "self/noncausal" and r["mode"] == "fwd" and r["length"] == 1024)]}
    h = next(h for h in az.headlines(cut) if (h.pattern, h.mode) == ("self/noncausal", "fwd"))
    assert (h.measured, h.shorter) == (2, 1)
    assert "1 more measured only at shorter lengths" in az.headline_verdict(h)
    assert "shorter" not in az.headline_verdict(next(h for h in az.headlines(res)))


def test_a_difference_inside_the_noise_is_not_faster():
    assert not az.beyond_noise(1.0, 0.2, 1.09, 0.0)
    assert az.beyond_noise(1.0, 0.2, 1.11, 0.0)
    assert az.beyond_noise(1.0, None, 1.01, None)


def test_crossovers_pick_each_familys_best_and_say_measured_or_extrapolated(res):
    best = {(c.family, c.pattern, c.mode, c.metric): c for c in az.crossovers(res)}
    lin = best[("linear", "self/causal", "fwd", "time")]
    assert lin.method == "lightning"  # crosses at 500, linear (causal) at 675
    assert lin.kind == "crossing" and not lin.extrapolated and 256 < lin.length < 1024
    assert az.crossover_text(lin).endswith("measured")
    noncausal = best[("linear", "self/noncausal", "fwd", "time")]
    assert noncausal.method == "linear" and noncausal.length == pytest.approx(375, rel=0.01)  # 1.5e-6 n = 4e-9 n²
    assert best[("sparse", "self/noncausal", "fwd", "time")].kind == "never"
    families = [c.family for c in az.crossovers(res) if c.mode == "fwd"]
    assert families.index("structured") < families.index("sparse") < families.index("linear")  # catalogue order


@pytest.mark.parametrize("kind, length, extrapolated, text", [
    ("always", None, False, "always (from 256)"),
    ("crossing", 2100.0, False, "2.1k measured"),
    ("crossing", 9000.0, True, "> 4096 (extrapolated ~9.0k)"),
    ("until", 3000.0, False, "until 3.0k"),
    ("never", None, False, "never (to 4096)"),
])
def test_crossover_text(kind, length, extrapolated, text):
    c = az.Crossover("linear", "self/causal", "fwd", "time", "m", "torch", kind, length, extrapolated, 256, 4096)
    assert az.crossover_text(c) == text


def test_missing_groups_by_status_and_reason_failures_first(res):
    groups = az.missing(res)
    assert [(m.status, m.cases) for m in groups] == [("error", 1), ("unsupported", 1), ("skipped", 6)]
    assert groups[0].methods == ("moba",) and groups[0].reason == "RuntimeError: boom"
    assert groups[1].reason == az.SWEEP_REFUSED and groups[1].phases == ("approximation",)
    assert groups[2].reason == FLEX_SKIP and groups[2].methods == ("sliding_window",)


def test_reasons_differing_in_numbers_form_one_group():
    rows = [{"method": m, "status": "unsupported", "reason": f"kernel_size: expected odd sizes, got {n}"}
            for m, n in (("a", 4), ("b", 14), ("a", 14))]
    (group,) = az.missing({"efficiency": rows})
    assert group.cases == 3 and group.methods == ("a", "b") and group.reason.endswith("got 4")


def test_unknown_methods_are_family_other():
    assert az.method_info("no_such_method") == ("other", None)
    assert az.method_info("linear") == ("linear", True)


def test_markdown_says_what_the_page_says(res):
    a = az.answers(res)
    text = "\n".join(az.answers_markdown(a))
    assert "**self/noncausal, forward at N = 1024 (SDPA 4.19 ms)**" in text
    assert "| linear | linear | 1.54 ms |" in text
    assert "mqar (pairs=4, vocab=16)" in text
    assert "- error · 1 case (efficiency) · moba — RuntimeError: boom" in text


def test_no_answers_without_a_sweep():
    a = az.answers({"suites": [], "efficiency": []})
    assert a.headlines == () and a.crossovers == () and a.missing == () and az.answers_markdown(a) == []
