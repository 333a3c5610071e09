"""A radiologist's viewer shows our results: OHIF 3 in headless Chromium opens a study straight
from the node's own DICOMweb (QIDO-RS, WADO-RS metadata, frames and bulk data) and renders the
node's DICOM-SEG over the CT, each segment in its recommended colour, with the segment labels in
OHIF's segmentation panel.

OHIF's built viewer (``tests/viewer/setup.sh`` unpacks the ``dist/`` of ``@ohif/app`` under
``.cache/ohif/``) is served at the site root by a small proxy that forwards ``/dicomweb/*`` to the
node with a viewer's bearer token, so the viewer and DICOMweb share one origin, as behind a
hospital's reverse proxy that signs its users in.

OHIF 3.12.10 does not show the TID 1500 SR: its measurements are volumetric, tied to the SEG's
segments (TID 1411) rather than to image coordinates, which OHIF cannot place, and opening the SR
ends the viewer with a TypeError (``measurement.coords[0]`` is undefined). A strict xfail keeps
watch for the day it does.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from skimage.color import lab2rgb, rgb2hsv
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route

from pacs_node.catalog.jobs import queue_job
from pacs_node.catalog.models import Role
from pacs_node.catalog.results import StoredEncoding, add_result_rows, write_files
from tests.browser import CHROMEDRIVER, CHROMIUM, start_chromium, stop_chromium
from tests.catalog_factory import ingest
from tests.conftest import PACS_NODE, clean_env, wait_for
from tests.ct_phantom import make_ct_phantom, write_phantom_series
from tests.web_node import WebNode, start_web_node

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
OHIF_VERSION = "3.12.10"
OHIF_SETUP = ROOT / "tests" / "viewer" / "setup.sh"
OHIF_DIST = ROOT / ".cache" / "ohif" / OHIF_VERSION / "dist"
# WebGL in software: cornerstone3D renders with it
SWIFTSHADER = ("--enable-unsafe-swiftshader",)
SLICES = 40
# Hop-by-hop headers (RFC 9110 section 7.6.1) and the framing the proxy redoes itself.
NOT_FORWARDED = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-encoding",
}
ISOLATION = {  # cross-origin isolation: lets cornerstone3D use SharedArrayBuffer
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}


def app_config(origin: str) -> str:
    """OHIF's ``window.config``: one DICOMweb data source, the node behind the proxy."""
    dicomweb = f"{origin}/dicomweb"
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "disableConfirmationPrompts": True,  # a SEG opened in a viewport loads without asking
        "investigationalUseDialog": {"option": "never"},
        "customizationService": {"ohif.tours": {"$set": []}},  # no onboarding tour
        "maxNumberOfWebWorkers": 2,
        "defaultDataSourceName": "pacs-node",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "pacs-node",
                "configuration": {
                    "friendlyName": "pacs-node DICOMweb",
                    "name": "pacs-node",
                    "qidoRoot": dicomweb,
                    "wadoRoot": dicomweb,
                    "wadoUriRoot": dicomweb,
                    "qidoSupportsIncludeField": True,
                    "supportsReject": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


def viewer_app(dist: Path, node_url: str, token: str) -> Starlette:
    """OHIF's static files at the root (index.html for its client-side routes) and /dicomweb/*
    forwarded to the node with a bearer token and the Host header kept, so the node's retrieve
    and bulk data URIs name our origin."""
    client = httpx.AsyncClient(base_url=node_url, timeout=60)

    async def dicomweb(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED}
        headers["Authorization"] = f"Bearer {token}"
        path = f"/dicomweb/{request.path_params['path']}"
        upstream = client.build_request(
            "GET", httpx.URL(path, query=request.url.query.encode()), headers=headers
        )
        reply = await client.send(upstream, stream=True)
        passed = {k: v for k, v in reply.headers.items() if k.lower() not in NOT_FORWARDED}
        return StreamingResponse(
            reply.aiter_bytes(),
            status_code=reply.status_code,
            headers={**passed, **ISOLATION},
            background=BackgroundTask(reply.aclose),
        )

    async def config(request: Request) -> Response:
        origin = f"{request.url.scheme}://{request.url.netloc}"
        return Response(app_config(origin), media_type="text/javascript", headers=ISOLATION)

    async def static(request: Request) -> Response:
        file = (dist / request.path_params["path"]).resolve()
        if not (file.is_file() and file.is_relative_to(dist)):
            file = dist / "index.html"
        return FileResponse(file, headers=ISOLATION)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:
            yield

    return Starlette(
        routes=[
            Route("/app-config.js", config),
            Route("/dicomweb/{path:path}", dicomweb),
            Route("/{path:path}", static),
        ],
        lifespan=lifespan,
    )


@dataclass
class ViewerServer:
    """The proxy app on a loopback socket of its own, served by uvicorn in a thread."""

    app: Starlette
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ViewerServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.server = server
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: server.started, 15, what="the viewer proxy")
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(15)


@dataclass(frozen=True)
class Segment:
    label: str
    hue: float  # degrees, of the recommended display colour
    saturation: float


@dataclass(frozen=True)
class Viewer:
    url: str
    study_uid: str
    seg_description: str
    sr_description: str
    segments: list[Segment]

    def study_url(self) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={self.study_uid}"


def segment_colours(seg_path: Path) -> list[Segment]:
    """Each segment's label and the hue of its Recommended Display CIELab Value."""
    seg = dcmread(seg_path, stop_before_pixels=True)
    segments = []
    for item in seg.SegmentSequence:
        big_l, big_a, big_b = (int(v) for v in item.RecommendedDisplayCIELabValue)
        lab = [big_l * 100 / 65535, big_a * 255 / 65535 - 128, big_b * 255 / 65535 - 128]
        hue, saturation, _ = rgb2hsv(lab2rgb(np.array([[lab]])))[0, 0]
        segments.append(Segment(str(item.SegmentLabel), float(hue) * 360, float(saturation)))
    return segments


def require_browser_and_viewer() -> None:
    """Skip only when Chromium, chromedriver or OHIF cannot be had (`make test` installs them)."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    if not (OHIF_DIST / "index.html").is_file():
        run = subprocess.run(
            ["bash", str(OHIF_SETUP)], capture_output=True, text=True, timeout=300, check=False
        )
        if run.returncode != 0:
            pytest.skip(f"OHIF {OHIF_VERSION} could not be installed: {run.stderr.strip()}")


def record_results(node: WebNode, study_id: int, files: list[Path]) -> None:
    """The objects ``pacs-node segment`` made, recorded as one job's stored results."""
    items = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        items.append(
            StoredEncoding(
                kind=path.stem,
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                encoding=str(ds.file_meta.TransferSyntaxUID),
                data=path.read_bytes(),
            )
        )
    with node.catalog.sessions.begin() as session:
        job_id = queue_job(session, study_id, "ct-classical", [], {})
        relpaths = write_files(node.settings.node.data_dir / "results", f"{job_id}/1", items)
        add_result_rows(session, job_id, items, relpaths)


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewer]:
    """A phantom CT received by the node and every DICOM object ``pacs-node segment`` made of
    it stored as the node's results, and OHIF in front of the node's DICOMweb."""
    require_browser_and_viewer()
    root = tmp_path_factory.mktemp("viewer")
    phantom = make_ct_phantom(3, shape=(SLICES, 192, 192), spacing=(5.0, 1.8, 1.8))
    sources = write_phantom_series(phantom, root / "series")
    out = root / "out"
    run = subprocess.run(
        [PACS_NODE, "segment", "ct-classical", str(root / "series"), "--out", str(out),
         "--models-dir", str(MODELS)],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    seg_path = out / "dicom" / "seg.dcm"
    seg = dcmread(seg_path, stop_before_pixels=True)
    node = start_web_node(root / "var")
    server: ViewerServer | None = None
    try:
        study_id, _, _ = ingest(node.catalog, node.settings.node.spool_dir, sources)
        record_results(node, study_id, sorted((out / "dicom").iterdir()))
        token = node.user("ohif", Role.VIEWER)
        server = ViewerServer(viewer_app(OHIF_DIST, node.url, token)).start()
        yield Viewer(
            server.url,
            str(seg.StudyInstanceUID),
            str(seg.SeriesDescription),
            str(dcmread(out / "dicom" / "sr.dcm", stop_before_pixels=True).SeriesDescription),
            segment_colours(seg_path),
        )
    finally:
        if server is not None:
            server.stop()
        node.server.stop()
        node.recorder.stop()
        node.catalog.dispose()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium at the size OHIF lays out for."""
    driver = start_chromium(tmp_path, window=(1440, 900), extra=SWIFTSHADER)
    try:
        yield driver
    finally:
        stop_chromium(driver, tmp_path)


def page_text(driver: webdriver.Chrome) -> str:
    return str(driver.execute_script("return document.body.innerText"))


def viewport_rgb(driver: webdriver.Chrome) -> NDArray[np.float64]:
    """The viewport's image as the radiologist sees it, RGB in [0, 1], without the coloured
    frame and icons OHIF draws along its edges."""
    pane = driver.find_element(By.CSS_SELECTOR, "[data-cy=viewport-pane]")
    image = Image.open(io.BytesIO(pane.screenshot_as_png)).convert("RGB")
    return np.asarray(image, dtype=np.float64)[32:-32, 32:-32] / 255.0


def segment_coverage(rgb: NDArray[np.float64], segments: list[Segment]) -> dict[str, float]:
    """For each segment, the fraction of pixels coloured (not grey) with a hue within 15 degrees
    of its recommended colour's."""
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    coloured = chroma > 0.05
    hue = rgb2hsv(rgb)[..., 0] * 360
    coverage = {}
    for segment in segments:
        distance = np.abs((hue - segment.hue + 180) % 360 - 180)
        coverage[segment.label] = float((coloured & (distance < 15)).mean())
    return coverage


def open_study(driver: webdriver.Chrome, viewer: Viewer) -> None:
    """Open the study in OHIF's viewer and wait until the CT stack is on screen."""
    driver.get(viewer.study_url())

    def ct_slice_shown() -> bool:
        overlays = driver.find_elements(By.CSS_SELECTOR, "[data-cy=viewport-overlay-bottom-right]")
        return any(f"/{SLICES})" in o.text for o in overlays)

    wait_for(ct_slice_shown, 60, interval=0.25, what="OHIF to show the CT series")


def middle_slice(driver: webdriver.Chrome) -> None:
    """Page to the middle of the stack, where the lungs are widest, one press of OHIF's
    next-image (or previous-image) hotkey at a time until the viewport's overlay says so."""
    target = SLICES // 2 + 1
    body = driver.find_element(By.TAG_NAME, "body")

    def on_target() -> bool:
        overlay = driver.find_element(By.CSS_SELECTOR, "[data-cy=viewport-overlay-bottom-right]")
        shown = re.search(rf"\((\d+)/{SLICES}\)", overlay.text)
        if shown is None:
            return False
        current = int(shown.group(1))
        if current != target:
            body.send_keys(Keys.ARROW_DOWN if current < target else Keys.ARROW_UP)
        return current == target

    wait_for(on_target, 30, interval=0.1, what=f"slice {target} of {SLICES} on screen")


def open_series(driver: webdriver.Chrome, description: str) -> None:
    """Double-click a series in OHIF's study browser: it loads into the active viewport."""
    label = driver.find_element(
        By.XPATH, f"//*[@data-cy='series-description-label'][normalize-space()='{description}']"
    )
    ActionChains(driver).double_click(label).perform()


def test_ohif_renders_the_seg_over_the_ct(
    viewer: Viewer, chromium: webdriver.Chrome, tmp_path: Path
) -> None:
    driver = chromium
    coloured = [s for s in viewer.segments if s.saturation > 0.2]  # a near-white bone is not
    assert {s.label for s in coloured} >= {"Body", "Left lung", "Right lung"}

    open_study(driver, viewer)
    middle_slice(driver)
    before = viewport_rgb(driver)
    Image.fromarray((before * 255).astype(np.uint8)).save(tmp_path / "ohif-ct.png")
    coverage = segment_coverage(before, coloured)
    assert all(share < 0.001 for share in coverage.values()), coverage  # a plain grey CT

    open_series(driver, viewer.seg_description)

    def overlay_drawn() -> bool:
        coverage = segment_coverage(viewport_rgb(driver), coloured)
        return all(share > 0.005 for share in coverage.values())

    wait_for(overlay_drawn, 60, interval=0.5, what="the SEG's segments drawn over the CT")
    middle_slice(driver)  # the SEG viewport opens on the first slice
    wait_for(overlay_drawn, 15, interval=0.5, what="the segments on the middle slice")

    driver.find_element(By.CSS_SELECTOR, "[data-cy=panelSegmentation-btn]").click()
    labels = [s.label for s in viewer.segments]
    wait_for(
        lambda: all(label in page_text(driver) for label in labels),
        30,
        what=f"the segment labels {labels} in OHIF's segmentation panel",
    )
    wait_for(overlay_drawn, 30, interval=0.5, what="the overlay redrawn beside the panel")
    assert viewer.seg_description in page_text(driver)
    driver.save_screenshot(str(tmp_path / "ohif-seg.png"))


@pytest.mark.xfail(
    strict=True,
    reason="OHIF 3.12.10 places only SR measurements with image coordinates; opening our "
    "TID 1500 SR (volumetric, per segment) ends the viewer with a TypeError",
)
def test_ohif_lists_the_sr_measurements(
    viewer: Viewer, chromium: webdriver.Chrome, tmp_path: Path
) -> None:
    driver = chromium
    open_study(driver, viewer)
    open_series(driver, viewer.sr_description)
    console: list[str] = []

    def settled() -> bool:
        console.extend(entry["message"] for entry in driver.get_log("browser"))
        crashed = any("Error Boundary" in message for message in console)
        return crashed or "mL" in page_text(driver).split()

    wait_for(settled, 30, interval=0.5, what="OHIF to show the SR's measurements or fail")
    driver.save_screenshot(str(tmp_path / "ohif-sr.png"))
    assert "mL" in page_text(driver).split(), "\n".join(m for m in console if "Error" in m)
