import math

import pytest

from attnzoo.bench.fit import efficiency_length, fit_power_law

LENGTHS = [256, 512, 1024, 2048, 4096]


def sdpa(n: float) -> float:
    return 1e-9 * n**2


def test_power_law_recovers_exponent():
    fit = fit_power_law(LENGTHS, [3e-7 * n**1.5 for n in LENGTHS])
    assert fit.exponent == pytest.approx(1.5)
    assert math.exp(fit.intercept) == pytest.approx(3e-7)


def test_crossing_inside_the_range():
    # c·N = 1e-9·N² at N = 1000: the linear method is cheaper beyond 1000
    e = efficiency_length(LENGTHS, [1e-6 * n for n in LENGTHS], LENGTHS, [sdpa(n) for n in LENGTHS])
    assert e.kind == "crossing"
    assert e.length == pytest.approx(1000, rel=1e-6)
    assert not e.extrapolated
    assert e.exponent == pytest.approx(1.0) and e.baseline_exponent == pytest.approx(2.0)


def test_crossing_extrapolated_beyond_the_range():
    e = efficiency_length(LENGTHS, [1e-5 * n for n in LENGTHS], LENGTHS, [sdpa(n) for n in LENGTHS])
    assert e.kind == "crossing" and e.extrapolated
    assert e.length == pytest.approx(10_000, rel=1e-6)


def test_never_when_slower_and_growing_as_fast():
    e = efficiency_length(LENGTHS, [3 * sdpa(n) for n in LENGTHS], LENGTHS, [sdpa(n) for n in LENGTHS])
    assert e.kind == "never" and e.length is None


def test_never_when_the_crossing_is_far_beyond_the_range():
    e = efficiency_length(LENGTHS, [1e-9 * n**1.99 * 1e3 for n in LENGTHS], LENGTHS, [sdpa(n) for n in LENGTHS])
    assert e.kind == "never"


def test_always_when_cheaper_everywhere():
    e = efficiency_length(LENGTHS, [1e-9 * n for n in LENGTHS], LENGTHS, [sdpa(n) for n in LENGTHS])
    assert e.kind == "always" and e.describe() == "always"


def test_until_when_cheaper_at_short_lengths_only():
    e = efficiency_length(LENGTHS, [1e-12 * n**3 for n in LENGTHS], LENGTHS, [sdpa(n) for n in LENGTHS])
    assert e.kind == "until"
    assert e.length == pytest.approx(1000, rel=1e-6)


def test_unknown_with_a_single_length():
    e = efficiency_length([512], [1.0], LENGTHS, [sdpa(n) for n in LENGTHS])
    assert e.kind == "unknown"
