"""``attnzoo bench --suite quality``: the grid, the per-method learning-rate sweep, the rows and tables, and resuming
after an interruption without retraining finished cases."""

import argparse
import json

import pytest

from attnzoo.bench import add_arguments, main
from attnzoo.bench import quality as harness
from attnzoo.bench.suites import quality
from attnzoo.bench.tables import lr_sweep_table, study_table
from attnzoo.errors import AttnzooError

TINY = quality.QualityStudy(pairs=(2, 4), widths=(8,), vocab=16, induction_seq=8, induction_vocab=8, copy_seq=6,
                            copy_tokens=2, copy_vocab=8, sweep_pairs=2, width=8, lrs=(1e-3, 1e-2), layers=1,
                            steps=2, batch=2, workers=1)


def test_the_grid_the_sweep_and_the_methods():
    labels = [s.label for s in quality.settings(TINY)]
    assert labels == ["MQAR 2 pairs, w8", "MQAR 4 pairs, w8", "induction seq 8, w8", "selective copy seq 6, w8"]
    assert [m.name for m in quality.methods(["linear"])] == ["softmax", "linear"]
    assert "sliding_window" in [m.name for m in quality.methods()]
    with pytest.raises(AttnzooError, match="--cases"):
        quality.methods(["no_such_method"])
    assert quality.sweep_setting(TINY).label == "MQAR 2 pairs, w8"
    with pytest.raises(AttnzooError, match="sweep_pairs"):
        quality.QualityStudy(sweep_pairs=3)
    with pytest.raises(AttnzooError, match="width"):
        quality.QualityStudy(width=48)


@pytest.fixture
def counted(monkeypatch):
    """Every case the study trains, in order (the real training runs)."""
    trained = []
    real = harness.run_case

    def run_case(case):
        trained.append(quality.case_key(case))
        return real(case)

    monkeypatch.setattr(harness, "run_case", run_case)
    return trained


def run(out, patterns=("sliding_window", "landmark")):
    return quality.run(out, list(patterns), TINY, command="test", echo=lambda _: None, isolate=False)


def test_every_method_sweeps_then_trains_its_grid_at_the_chosen_rate(tmp_path, counted):
    results = run(tmp_path)
    assert results["status"] == "complete"
    rows = [r for r in results["quality"] if r["status"] == "ok"]
    # per method: 2 rates on the reference setting, then the 3 other settings at the chosen rate
    assert len(rows) == len(counted) == 2 * (2 + 3)
    for method in ("softmax", "sliding_window"):
        mine = [r for r in rows if r["method"] == method]
        lr = harness.choose_lr(mine)
        assert sorted(r["lr"] for r in mine if r["sweep"]) == [1e-3, 1e-2]
        assert {r["setting"] for r in mine if r["lr"] == lr} == {s.label for s in quality.settings(TINY)}
    window = next(r for r in rows if r["method"] == "sliding_window" and r["setting"] == "MQAR 4 pairs, w8")
    assert window["sizes"] == {"window": 2} and window["seq"] == 12
    skipped = [r for r in results["quality"] if r["status"] == "skipped"]
    assert [r["method"] for r in skipped] == ["landmark"]
    header, body = study_table(results)
    assert header[5:9] == [s.label for s in quality.settings(TINY)] and len(body) == 2
    assert all(cell == "untrained" or float(cell) >= 0 for line in body for cell in line[5:9])
    assert [line[0] for line in lr_sweep_table(results)[1]] == ["softmax", "sliding_window"]
    text = (tmp_path / "quality.md").read_text()
    assert "Learning-rate sweep" in text and "landmark" in text
    assert json.loads((tmp_path / "results.json").read_text())["schema"] == "attnzoo.bench/1.5"


def test_a_rerun_resumes_without_retraining_finished_cases(tmp_path, counted):
    first = run(tmp_path, ["sliding_window"])
    journal = tmp_path / quality.JOURNAL
    lines = journal.read_text().splitlines()
    assert len(lines) == len(counted) == 10
    # an interruption: the journal holds the first 6 cases and half a line of the 7th
    journal.write_text("\n".join(lines[:6]) + "\n" + lines[6][: len(lines[6]) // 2])
    counted.clear()
    second = run(tmp_path, ["sliding_window"])
    assert counted == [quality.case_key(json.loads(line)) for line in lines[6:]]
    key = quality.case_key
    assert sorted((key(r), r["accuracy"]) for r in second["quality"]) == sorted(
        (key(r), r["accuracy"]) for r in first["quality"])
    counted.clear()
    run(tmp_path, ["sliding_window"])
    assert counted == []


def test_cli_full_belongs_to_the_quality_suite(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args(["--full", "--out", str(tmp_path)])) == 2
    assert "--full" in capsys.readouterr().err
    assert main(parser.parse_args(["--suite", "quality", "--full", "--device", "cuda:9", "--out",
                                   str(tmp_path)])) == 2
