"""report.html without a browser: one offline file, no raw Markdown, rows and cells carrying what sorting and
filtering need, the figures slot."""

import re

import pytest

from attnzoo.bench.html_page import report_html, row_attributes, table_html
from attnzoo.bench.tables import Num
from tests.bench.sample_results import completed

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


@pytest.fixture(scope="module")
def res():
    return completed()


def test_one_offline_file_without_raw_markdown(res, tmp_path):
    text = report_html(res, tmp_path, [])
    assert "http://" not in text and "https://" not in text and "<script src" not in text
    assert "**" not in text and "`" not in re.sub(r"<script>.*?</script>", "", text, flags=re.S)
    assert "<span class='az-badge complete'>complete</span>" in text
    assert text.index("id='answers'") < text.index("id='table-0'")  # answers first, then the detail


def test_rows_carry_filters_and_cells_their_values(res, tmp_path):
    text = report_html(res, tmp_path, [])
    row = re.search(r"<tr data-mode='fwd' data-pattern='self/causal' data-backend='torch' data-family='linear' "
                    r"data-kind='exact'><td>lightning</td>.*?</tr>", text)
    assert row is not None
    assert "data-value='1024.0'" in row.group(0)


def test_row_attributes_come_from_the_columns():
    attrs = row_attributes(["method", "backend", "pattern"], ["moba", "torch", "self/causal"], "fwd")
    assert attrs == {"mode": "fwd", "pattern": "self/causal", "backend": "torch", "family": "sparse",
                     "kind": "approximate"}
    assert row_attributes(["press", "budget"], ["SnapKV", "10 %"]) == {}


def test_tables_escape_text_and_mark_numbers():
    text = table_html("t", ["method", "ms"], [["<b>", Num("1.5", 1.5)], ["x", "—"]])
    assert "&lt;b&gt;" in text and "<td data-value='1.5'>1.5</td>" in text and "<td class='az-n'>—</td>" in text
    assert "<th class=az-num title='median wall time" in text


def test_figures_fragment_replaces_the_curve_pngs_only(res, tmp_path):
    for name in ("time_fwd.png", "ratio_fwd.png"):
        (tmp_path / name).write_bytes(PNG)
    with_png = report_html(res, tmp_path, ["time_fwd.png", "ratio_fwd.png"])
    assert with_png.count("<figure class='az-figure'><img") == 2 and "data:image/png;base64," in with_png
    assert "<figcaption>Forward time against sequence length" in with_png
    fragment = "<figure class='az-figure'><div id='plot-1'></div></figure>"
    interactive = report_html(res, tmp_path, ["time_fwd.png", "ratio_fwd.png"], figures=fragment)
    assert fragment in interactive and interactive.count("data:image/png") == 1  # the ratio bars stay
    assert "alt='time_fwd'" not in interactive and "alt='ratio_fwd'" in interactive


def test_a_suite_run_has_no_answers_section(tmp_path):
    text = report_html({"status": "complete", "suites": [], "efficiency": []}, tmp_path, [])
    assert "id='answers'" not in text and "<h1>" in text
