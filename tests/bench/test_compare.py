"""``--compare``: changes beyond the threshold and the noise, and the HTML page."""

import copy

import pytest

from attnzoo.bench import compare
from attnzoo.bench import results as schema
from tests.bench.sample_results import completed


@pytest.fixture(scope="module")
def runs():
    a = completed()
    b = copy.deepcopy(a)
    for r in b["efficiency"]:
        if r["status"] != "ok":
            continue
        if r["method"] == "linear":  # 30 % slower, IQRs 2 %: a real change
            r["time_median_s"] *= 1.3
        elif r["method"] == "lightning":  # 15 % faster but IQRs of 40 %: inside the noise
            r["time_iqr_s"] = 0.4 * r["time_median_s"]
            r["time_median_s"] *= 0.85
    return a, b


def test_changes_inside_the_noise_are_unchanged(runs):
    changes = {(c["case"][0], c["case"][2], c["case"][3], c["case"][4]): c for c in compare.case_changes(*runs)}
    assert changes[("linear", "self/causal", "fwd", 1024)]["change"] == "slower"
    assert changes[("lightning", "self/causal", "fwd", 1024)]["change"] == "unchanged"
    assert changes[("softmax", "self/causal", "fwd", 1024)]["change"] == "unchanged"
    out = compare.compare(*runs)
    assert {c["case"][0] for c in out["slower"]} == {"linear"} and out["faster"] == []
    assert len(out["unchanged"]) == len(changes) - len(out["slower"])


def test_main_writes_the_page_next_to_the_text(runs, tmp_path):
    for name, res in zip(("a.json", "b.json"), runs):
        schema.save_results(tmp_path / name, res)
    page = tmp_path / "compare.html"
    text = compare.main(str(tmp_path / "a.json"), str(tmp_path / "b.json"), html_path=page)
    assert "## Slower (8)" in text and "1.30×" in text and f"page: {page}" in text
    html = page.read_text()
    assert html.count("data-change='slower'") == 8 and "data-change='unchanged'" in html
    assert "<select data-filter='change'>" in html and "<select data-filter='family'>" in html
    assert "id='table-cases'" in html and "**" not in html
