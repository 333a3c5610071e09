"""The upload page in headless Chromium: files and a zip (one entry deflated, one stored) go to
STOW-RS with the page's session and CSRF token; each file shows its result, files that are not
DICOM show as skipped."""

from __future__ import annotations

import zipfile
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from sqlalchemy import select

from pacs_node.catalog.models import Instance, Role
from pacs_node.services import accounts
from pacs_node.web.auth import SESSION_COOKIE
from tests.browser import chromium
from tests.conftest import wait_for
from tests.dicom_factory import write_series
from tests.web_node import PASSWORD, SETUP, WebNode, web_node

__all__ = ["chromium", "web_node"]

pytestmark = pytest.mark.integration


def test_a_folder_and_a_zip_are_uploaded_file_by_file(
    web_node: WebNode, chromium: webdriver.Chrome, tmp_path: Path
) -> None:
    files = write_series(tmp_path / "cd", slices=5, rows=16, columns=16)
    uids = [str(pydicom.dcmread(path).SOPInstanceUID) for path in files]
    mismatched = tmp_path / "cd" / "mismatched.dcm"  # its meta names another instance
    other = uids[2][:-1] + ("1" if uids[2][-1] != "1" else "2")
    mismatched.write_bytes(files[2].read_bytes().replace(uids[2].encode(), other.encode(), 1))
    (tmp_path / "cd" / "README.TXT").write_text("Viewer on this CD: run setup.exe")
    (tmp_path / "cd" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    archive = tmp_path / "cd" / "images.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(files[3], "IMAGES/IM3", compress_type=zipfile.ZIP_DEFLATED)
        zipped.write(files[4], "IMAGES/IM4", compress_type=zipfile.ZIP_STORED)
        zipped.writestr("NOTES.TXT", "not an image")
    chosen = [files[0], files[1], mismatched, tmp_path / "cd" / "README.TXT"]
    chosen += [tmp_path / "cd" / "DICOMDIR", archive]

    accounts.create_user(web_node.catalog, "uploader", Role.OPERATOR, PASSWORD, SETUP)
    principal = accounts.authenticate_password(web_node.catalog, "uploader", PASSWORD)
    assert isinstance(principal, accounts.Principal)
    session = accounts.open_session(web_node.catalog, principal, timedelta(hours=1))
    chromium.get(f"{web_node.url}/healthz")
    chromium.add_cookie({"name": SESSION_COOKIE, "value": session.cookie, "path": "/"})
    chromium.get(f"{web_node.url}/upload")
    picker = chromium.find_element(By.ID, "pick-files")
    picker.send_keys("\n".join(str(path) for path in chosen))

    summary = chromium.find_element(By.ID, "summary")
    wait_for(lambda: "done" in summary.text, 30, what="the upload to finish")
    chromium.save_screenshot(str(tmp_path / "upload.png"))
    results = {
        row.find_elements(By.TAG_NAME, "td")[0].text: row.find_elements(By.TAG_NAME, "td")[1].text
        for row in chromium.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    }
    assert results == {
        files[0].name: "stored",
        files[1].name: "stored",
        "mismatched.dcm": "failed",
        "README.TXT": "skipped",
        "DICOMDIR": "skipped",
        "images.zip/IMAGES/IM3": "stored",
        "images.zip/IMAGES/IM4": "stored",
        "images.zip/NOTES.TXT": "skipped",
    }
    assert summary.text.startswith("4 stored, 1 failed, 3 skipped")
    assert float(chromium.find_element(By.ID, "progress").get_attribute("value") or 0) == 1

    # a folder, as a CD's: nested folders walked, its relative paths shown
    folder = write_series(tmp_path / "cd2" / "DICOM" / "S1", slices=2, rows=16, columns=16)
    (tmp_path / "cd2" / "AUTORUN.INF").write_text("[autorun]")
    (tmp_path / "cd2" / "COPY").mkdir()  # the same instance twice in one batch: both stored
    (tmp_path / "cd2" / "COPY" / "IM0").write_bytes(folder[0].read_bytes())
    chromium.find_element(By.ID, "pick-folder").send_keys(str(tmp_path / "cd2"))
    wait_for(lambda: summary.text.startswith("7 stored") and "done" in summary.text, 30)
    names = [row.text for row in chromium.find_elements(By.CSS_SELECTOR, "#results tbody tr")]
    assert sum(name.startswith("cd2/DICOM/S1/") and "stored" in name for name in names) == 2
    assert any(name.startswith("cd2/COPY/IM0 stored") for name in names)
    assert any(name.startswith("cd2/AUTORUN.INF skipped") for name in names)
    chromium.save_screenshot(str(tmp_path / "upload-folder.png"))
    uids += [str(pydicom.dcmread(path).SOPInstanceUID) for path in folder]
    stored = [uids[i] for i in (0, 1, 3, 4, 5, 6)]
    assert web_node.recorder.wait_idle(10)
    with web_node.catalog.sessions() as db:
        found = db.scalars(
            select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids))
        )
        assert sorted(found) == sorted(stored)
