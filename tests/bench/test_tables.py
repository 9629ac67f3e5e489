"""Table helpers: rounding to the measured noise, sortable cells, the run's facts."""

import math

import pytest

from attnzoo.bench.tables import Num, facts_markdown, noisy, round_to_noise, run_facts


@pytest.mark.parametrize("value, spread, text", [
    (12.345, 0.53, "12.3"),
    (12.345, 2.1, "12"),
    (12.345, 0.004, "12.35"),  # at most 4 significant digits
    (1234.0, 150.0, "1200"),
    (0.012345, 0.0021, "0.012"),
    (9.96, 0.05, "9.96"),
    (9.96, 0.5, "10"),  # rounding up adds a digit to the left
    (1.23456, 0.0, "1.23"),  # no spread: 3 significant digits
    (1.23456, None, "1.23"),
    (1.5, 30.0, "2"),  # spread above the value: one digit
    (0.0, 0.1, "0"),
])
def test_round_to_noise(value, spread, text):
    assert round_to_noise(value, spread) == text


def test_noisy_cells_sort_by_their_value():
    cell = noisy(0.0123456, 0.0005, 1e3)
    assert cell == "12.3" and isinstance(cell, Num) and cell.value == pytest.approx(12.3456)
    assert noisy(None, 0.1) == "—" and noisy(math.nan, 0.1) == "—"
    assert f"{cell} ms" == "12.3 ms"


def test_facts_are_rendered_not_markdown_in_text():
    facts = dict(run_facts({"status": "complete", "wall_s": 3.0, "command": "attnzoo bench --quick",
                            "config": {"batch": 1, "budgets_s": {"efficiency": 95.0}}}))
    assert facts["status"] == "complete" and facts["command"] == "attnzoo bench --quick"
    assert facts["budgets"] == "efficiency 95 s" and "**" not in "".join(facts.values())
    md = facts_markdown(list(facts.items()))
    assert "- status: **complete**" in md and "- command: `attnzoo bench --quick`" in md
