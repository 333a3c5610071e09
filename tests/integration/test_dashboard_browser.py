"""The node's own result viewer in headless Chromium: from the studies page (which refreshes
its table in place) to the study, into the viewer of its processed job; the segmentation drawn
over the CT, paged with the keyboard, a segment toggled off (the canvas loses that segment's
colour, on the patient's left, shown on the screen's right), with screenshots saved beside the
test (and once for the README)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from pacs_node.catalog.models import Role
from pacs_node.web.auth import SESSION_COOKIE
from tests.browser import chromium
from tests.conftest import wait_for
from tests.processed_study import ProcessedStudy, processed

__all__ = ["chromium", "processed"]

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README_SHOT = ROOT / "docs" / "img" / "viewer.png"  # written when missing; committed


def canvas_rgb(driver: webdriver.Chrome) -> NDArray[np.int16]:
    """The viewer canvas's own pixels (not a screenshot of the page), RGB."""
    url = driver.execute_script("return document.getElementById('view').toDataURL('image/png')")
    data = base64.b64decode(str(url).split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def drawn(driver: webdriver.Chrome) -> str:
    return str(driver.execute_script("return document.getElementById('view').dataset.drawn || ''"))


def test_viewer_draws_the_segmentation_and_toggles_a_segment(
    processed: ProcessedStudy, chromium: webdriver.Chrome, tmp_path: Path
) -> None:
    driver = chromium
    node = processed.node
    cookie, _ = processed.session(Role.VIEWER, name="radiologist")
    driver.get(f"{node.url}/static/node.css")  # the cookie's origin first
    driver.add_cookie({"name": SESSION_COOKIE, "value": cookie, "path": "/"})

    driver.get(f"{node.url}/")
    wait_for(  # the studies table refreshes itself from its fragment route
        lambda: driver.execute_script(
            "return document.getElementById('study-rows').dataset.refreshedAt"
        ),
        15,
        what="the studies table refreshed in place",
    )
    # the row's link read in one script: the table is replaced every few seconds, so an element
    # found first and clicked after may be gone
    link = driver.execute_script(
        "return document.querySelector(arguments[0]).href",
        f'tr[data-study="{processed.study_uid}"] a',
    )
    driver.get(link)
    wait_for(lambda: "Timeline" in driver.page_source, 10, what="the study page")
    driver.find_element(By.CSS_SELECTOR, "a.open-viewer").click()
    wait_for(lambda: drawn(driver), 20, what="the first slice drawn")
    middle = processed.phantom.hu.shape[0] // 2
    assert drawn(driver).startswith(f"{middle}|")

    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_DOWN)
    wait_for(lambda: drawn(driver).startswith(f"{middle + 1}|"), 10, what="the next slice")
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_UP)
    wait_for(lambda: drawn(driver).startswith(f"{middle}|"), 10, what="back to the middle")
    assert driver.find_element(By.ID, "slice-label").text == f"{middle + 1} / 24"
    shown = drawn(driver)
    before = canvas_rgb(driver)
    driver.save_screenshot(str(tmp_path / "viewer.png"))
    if not README_SHOT.exists():
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(README_SHOT))

    box = driver.find_element(
        By.XPATH, "//label[normalize-space()='Left lung']/input[@class='segment']"
    )
    box.click()
    wait_for(lambda: drawn(driver) != shown, 10, what="the canvas redrawn without the segment")
    after = canvas_rgb(driver)
    driver.save_screenshot(str(tmp_path / "viewer-left-lung-off.png"))

    changed = np.abs(after - before).sum(axis=-1) > 30
    lung = processed.phantom.truth["lung_left"][middle]
    assert changed[lung].mean() > 0.9  # the left lung lost its colour ...
    assert changed[~lung].mean() < 0.02  # ... and nothing else changed
    columns = np.nonzero(changed)[1]
    assert columns.mean() > before.shape[1] / 2  # patient's left: the screen's right
    chroma = after.max(axis=-1) - after.min(axis=-1)
    assert chroma[lung].mean() < 8  # grey CT where the lung was coloured
