"""``attnzoo bench --suite dynamic``: which methods run, the planted inputs, the oracle, the rows and the tables."""

import json

import pytest
import torch

import attnzoo as az
from attnzoo.bench.suites import dynamic
from attnzoo.bench.tables import dynamic_table, recall_table
from attnzoo.errors import AttnzooError

TINY = dynamic.DynamicSuite(seq=64, heads=2, head_dim=16, densities=(1 / 4, 1 / 16), steps=2, batch=4, pairs=4,
                            vocab=16, dim=16)


def test_every_method_with_a_density_setting_runs_and_patterns_filter():
    names = [m.name for m in dynamic.methods()]
    assert "moba" in names and "softmax" not in names and "block_sparse" not in names
    assert [m.name for m in dynamic.methods(["mob*"])] == ["moba"]
    with pytest.raises(AttnzooError, match="--cases"):
        dynamic.methods(["no_such_method"])


@pytest.mark.parametrize("causal", [True, False])
def test_planted_keys_hold_most_of_the_mass(causal):
    cfg = dynamic.DynamicSuite(seq=256, heads=2)
    q, k, _ = dynamic.inputs("planted", causal, cfg)
    p = az.attention(q, k, torch.eye(256).expand(1, 2, 256, 256), method="softmax", causal=causal)
    top4 = p.topk(4, dim=-1).values.sum(-1)
    assert float(top4.mean()) > 0.7
    _, _, _ = dynamic.inputs("random", causal, cfg)
    with pytest.raises(AttnzooError, match="kind"):
        dynamic.inputs("clustered", causal, cfg)


@pytest.mark.parametrize("causal", [True, False])
def test_the_oracle_at_full_density_is_softmax_and_reads_the_heaviest_blocks(causal):
    q, k, v = dynamic.inputs("planted", causal, TINY)
    full = dynamic.oracle_params(q, k, causal, 1.0)
    out = az.attention(q, k, v, method="block_sparse", causal=causal, **full)
    torch.testing.assert_close(out, az.attention(q, k, v, method="softmax", causal=causal), atol=1e-5, rtol=1e-5)
    sel = dynamic.oracle_params(q, k, causal, 1 / 16)["selection"]
    assert sel.block_k == 2 and int(sel.counts.max()) == 2


def test_run_writes_the_grid_and_the_recall_rows(tmp_path):
    results = dynamic.run(tmp_path, ["moba"], cfg=TINY, echo=lambda _: None)
    rows = results["dynamic"]
    grid = [r for r in rows if r["kind"] == "approximation"]
    # the oracle on both self patterns, moba on its one (causal), two inputs, two densities
    assert len(grid) == (2 + 1) * 2 * 2 and all(r["status"] == "ok" for r in grid)
    assert all(0 <= r["mass_recall"] <= 1 + 1e-6 and r["rel_l2"] >= 0 for r in grid)
    moba = {(r["inputs"], r["target_density"]): r for r in grid if r["method"] == "moba"}
    assert moba[("planted", 1 / 4)]["density"] > moba[("planted", 1 / 16)]["density"]
    recall = [r for r in rows if r["kind"] == "recall"]
    assert [r["method"] for r in recall] == ["softmax", "moba"] and all(r["status"] == "ok" for r in recall)
    header, body = dynamic_table(results)
    assert header[4].startswith("1/4") and len(body) == 6
    assert [line[0] for line in recall_table(results)[1]] == sorted(["softmax", "moba"], key=lambda n: -next(
        r["accuracy"] for r in recall if r["method"] == n))
    assert json.loads((tmp_path / "results.json").read_text())["schema"] == "attnzoo.bench/1.5"
    assert "Associative recall" in (tmp_path / "dynamic.md").read_text()
