"""report.html as a user sees it: rendered from a small sweep (tests/bench/sample_results.py) and opened in headless
Chromium through chromedriver (Debian's ``chromium`` and ``chromium-driver``; ``.ci/run`` installs them). Skipped,
with the reason, where Chromium, chromedriver or selenium is missing."""

import pytest

from attnzoo.bench.report import write_report
from tests.bench.browser import CHROMEDRIVER, CHROMIUM, MISSING, chromium, severe
from tests.bench.sample_results import sample_results

pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(MISSING)
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def report(browser, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(sample_results(), out)
    browser.get((out / "report.html").as_uri())
    return browser


@pytest.fixture
def page(report):
    """The loaded page with the filters reset."""
    for select in report.find_elements(By.CSS_SELECTOR, "select[data-filter]"):
        Select(select).select_by_value("")
    return report


def test_the_page_loads_without_javascript_errors(report):
    assert severe(report) == []
    assert report.find_element(By.CSS_SELECTOR, "h1 .az-badge").text == "complete"
    assert "**" not in report.find_element(By.TAG_NAME, "header").text  # no raw Markdown


def _fastest(driver, pattern):
    card = driver.find_element(By.CSS_SELECTOR, f".az-card[data-pattern='{pattern}']")  # forward's come first
    first = card.find_element(By.CSS_SELECTOR, "table tbody tr")
    return first.get_attribute("data-method"), card.text


def test_the_summary_names_the_fastest_method_per_pattern(report):
    method, text = _fastest(report, "self/noncausal")
    assert method == "linear" and "N = 1024 · SDPA 4.19 ms" in text
    method, _ = _fastest(report, "self/causal")
    assert method == "lightning"
    answers = report.find_element(By.ID, "answers").text
    assert "measured" in answers and "RuntimeError: boom" in answers


def _column(driver, table, name):
    headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    i = headers.index(name) + 1
    return [td.get_attribute("data-value") or td.text
            for td in table.find_elements(By.CSS_SELECTOR, f"tbody tr:not([hidden]) td:nth-child({i})")]


def test_clicking_a_header_sorts_the_rows_numerically(page):
    table = page.find_element(By.ID, "table-0")  # Efficiency, fwd
    header = next(th for th in table.find_elements(By.CSS_SELECTOR, "thead th") if th.text == "ms")
    header.click()
    values = [float(v) for v in _column(page, table, "ms")]
    assert values == sorted(values) and len(values) >= 8
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert [float(v) for v in _column(page, table, "ms")] == sorted(values, reverse=True)
    lengths = next(th for th in table.find_elements(By.CSS_SELECTOR, "thead th") if th.text == "N")
    lengths.click()
    assert _column(page, table, "N")[:2] == ["512.0", "1024.0"]  # moba's causal series stops at 512; as text, "1024"
    # would sort first


def test_filtering_by_family_hides_the_others(page):
    Select(page.find_element(By.CSS_SELECTOR, "select[data-filter='family']")).select_by_value("linear")
    rows = page.find_elements(By.CSS_SELECTOR, "table.az-table tbody tr[data-family]")
    shown = [r.get_attribute("data-family") for r in rows if r.is_displayed()]
    hidden = [r.get_attribute("data-family") for r in rows if not r.is_displayed()]
    assert shown and set(shown) == {"linear"}
    assert {"softmax", "structured", "sparse"} <= set(hidden)
    assert "of" in page.find_element(By.ID, "table-0-count").text


def test_every_figure_shows_an_image_canvas_or_svg(report):
    figures = report.find_elements(By.CSS_SELECTOR, ".az-figure")
    assert figures
    for figure in figures:
        drawn = report.execute_script(
            "var f = arguments[0], img = f.querySelector('img');"
            "return (img !== null && img.complete && img.naturalWidth > 0) || f.querySelector('canvas, svg') !== null;",
            figure)
        assert drawn, figure.get_attribute("outerHTML")[:200]


def test_column_meanings_are_one_hover_away(report):
    table = report.find_element(By.ID, "table-0")
    titles = {th.text: th.get_attribute("title") for th in table.find_elements(By.CSS_SELECTOR, "thead th")}
    assert "efficiency length" in titles["eff. length (time)"] and "N^p" in titles["time ∝ N^"]
    assert "interquartile" in titles["± IQR"]

