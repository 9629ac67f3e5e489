"""The interactive figures' fragment in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) through Selenium; skipped where either is missing."""

import pytest

from attnzoo.bench import interactive
from tests.bench.browser import CHROMEDRIVER, CHROMIUM, MISSING, chromium, severe

from .plot_data import results

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("plotly")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=MISSING)


@pytest.fixture
def browser(tmp_path):
    driver = chromium(tmp_path / "profile")
    try:
        yield driver
    finally:
        driver.quit()


def test_fragment_draws_every_figure_offline(browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    fragment = interactive.figures_html(results())
    page = tmp_path / "figures.html"
    page.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>figures</title></head><body>'
                    f"{fragment}</body></html>")
    browser.get(page.as_uri())
    count = fragment.count('class="az-figure"')
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(
        "return document.querySelectorAll('.az-figure svg.main-svg').length") >= count)
    assert browser.execute_script("return typeof window.Plotly.newPlot") == "function"
    assert browser.execute_script("return document.querySelectorAll('script[src^=\"blob:\"]').length") == 1
    for figure in browser.find_elements("css selector", ".az-figure"):
        assert figure.find_elements("css selector", "svg.main-svg")
        assert figure.find_elements("css selector", ".scatterlayer .trace")  # lines drawn
    shown = ("return [...new Set(document.querySelector('#az-fig-fwd .az-plot').data"
             ".filter(t => t.visible === true).map(t => t.meta.pattern))]")
    assert browser.execute_script(shown) == ["self/noncausal"]
    button = browser.find_elements("css selector", "#az-fig-fwd .updatemenu-button")[1]  # self/causal
    webdriver.ActionChains(browser).move_to_element(button).click().perform()
    WebDriverWait(browser, 5).until(lambda d: d.execute_script(shown) == ["self/causal"])
    assert severe(browser) == []
