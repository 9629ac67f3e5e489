"""Headless Chromium for the browser tests (Debian's ``chromium`` and ``chromium-driver``, which ``.ci/run`` installs,
driven through selenium), and, run as a script, the open time of a report page:

    python -m tests.bench.browser attnzoo-bench/report.html

prints, for three loads in one browser, when the load event fired and when every ``.az-figure`` had its image, canvas
or SVG drawn, and any console errors. Tests assert what the page does; this measures how long it takes.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000")
MISSING = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
UNDRAWN = ("return [...document.querySelectorAll('.az-figure')]"
           ".filter(f => !f.querySelector('svg.main-svg, canvas, img')).length")


def chromium(profile: Path) -> Any:
    """A headless Chromium driver with a fresh profile under ``profile``, logging the browser console; Selenium Manager
    is never allowed to download a browser or a driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


def severe(driver: Any) -> list[dict[str, Any]]:
    """The console's errors since the last call."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_times(page: Path, loads: int = 3) -> None:
    import tempfile

    driver = chromium(Path(tempfile.mkdtemp()))
    try:
        for i in range(loads):
            started = time.perf_counter()
            driver.get(page.resolve().as_uri())
            while driver.execute_script(UNDRAWN):
                time.sleep(0.02)
            drawn = time.perf_counter() - started
            load = driver.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd")
            print(f"load {i}: load event {load:.0f} ms, every figure drawn {drawn:.2f} s")
        print("console errors:", severe(driver))
    finally:
        driver.quit()


if __name__ == "__main__":
    open_times(Path(sys.argv[1]))
