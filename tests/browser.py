"""Headless Chromium for the browser tests: Debian's chromium driven by its chromedriver with a
fresh profile per test; the browser's console log is written beside the test's screenshots."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",  # no internet here: keep Chromium from calling Google
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def start_chromium(
    folder: Path, window: tuple[int, int] = (1400, 900), extra: tuple[str, ...] = ()
) -> webdriver.Chrome:
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, *extra):
        options.add_argument(flag)
    options.add_argument(f"--window-size={window[0]},{window[1]}")
    options.add_argument(f"--user-data-dir={folder / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(folder / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    return driver


def stop_chromium(driver: webdriver.Chrome, folder: Path) -> None:
    console = driver.get_log("browser")
    (folder / "console.log").write_text("\n".join(e["message"] for e in console))
    driver.quit()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium for one test, quit when it ends."""
    driver = start_chromium(tmp_path)
    try:
        yield driver
    finally:
        stop_chromium(driver, tmp_path)
