"""The dashboard pages and the result viewer through real HTTP requests, on a web node holding a
phantom CT study that a ct-classical job processed end to end."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import highdicom as hd
import httpx
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread

from pacs_node.actor import Actor
from pacs_node.catalog.deliveries import list_deliveries
from pacs_node.catalog.jobs import cancel_job, claim_job, queue_job, set_progress
from pacs_node.catalog.models import Role, Study
from pacs_node.services.viewer import CT_PRESETS
from pacs_node.web.auth import CSRF_FIELD, CSRF_HEADER
from pacs_node.web.viewer import pacs_viewer_link
from tests.ct_phantom import dice
from tests.processed_study import PACS_VIEWER, ProcessedStudy, cookies, processed

__all__ = ["processed"]

PAGES = (
    "/",
    "/studies/rows",
    "/jobs",
    "/jobs/rows",
    "/deliveries",
    "/models",
    "/routes",
    "/health",
)


@pytest.fixture(scope="module")
def viewer(processed: ProcessedStudy) -> Iterator[httpx.Client]:
    """A browser session of a user with the viewer role."""
    cookie, _ = processed.session(Role.VIEWER)
    with processed.node.client(role=None, cookies=cookies(cookie)) as client:
        yield client


def png(response: httpx.Response) -> NDArray[np.uint8]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_pages_send_a_browser_without_a_session_to_the_login_page(
    processed: ProcessedStudy,
) -> None:
    with processed.node.client(role=None) as anonymous:
        for path in (*PAGES, f"/studies/{processed.study_uid}", processed.viewer_path):
            answer = anonymous.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/login?next="), path
        slice_image = anonymous.get(f"{processed.viewer_path}/slices/0.png")
        assert slice_image.status_code == 303  # patient images too, never without a session


def test_every_page_renders_for_a_viewer(viewer: httpx.Client) -> None:
    for path in PAGES:
        answer = viewer.get(path)
        assert answer.status_code == 200, (path, answer.text[-2000:])
        assert answer.headers["content-type"].startswith("text/html")


def test_studies_page_lists_searches_and_pages(
    processed: ProcessedStudy, viewer: httpx.Client
) -> None:
    page = viewer.get("/").text
    assert f'data-study="{processed.study_uid}"' in page
    assert "Phantom^CT" in page
    assert "ct-classical" in page
    assert 'data-refresh="/studies/rows?page=1"' in page  # the live table's fragment route
    rows = viewer.get("/studies/rows").text
    assert f'data-study="{processed.study_uid}"' in rows
    assert "<html" not in rows  # a fragment, not a page
    for found in ("PHANTOM", "phantom^ct", processed.study_uid):
        assert processed.study_uid in viewer.get("/", params={"q": found}).text, found
    assert processed.study_uid not in viewer.get("/", params={"q": "Somebody^Else"}).text
    assert processed.study_uid not in viewer.get("/", params={"q": "%"}).text  # no wildcard
    assert processed.study_uid not in viewer.get("/", params={"date": "1999-01-01"}).text
    beyond = viewer.get("/", params={"page": 2}).text
    assert processed.study_uid not in beyond
    assert "newer" in beyond


def test_a_running_job_shows_its_stage_and_progress(
    processed: ProcessedStudy, viewer: httpx.Client
) -> None:
    catalog = processed.node.catalog
    with catalog.sessions.begin() as session:
        study_id = session.query(Study.id).filter_by(study_uid=processed.study_uid).scalar()
        job_id = queue_job(session, study_id, "ct-torso-organs", ["1.2.3.4.5"], {}, rule="ct")
    with catalog.sessions.begin() as session:
        assert claim_job(session, "web-test") == job_id
        assert set_progress(session, job_id, "web-test", "infer", 0.42)
    rows = viewer.get("/studies/rows").text
    assert re.search(
        r'ct-torso-organs: <span class="state running">running</span> '
        r'<span class="stage">infer</span> <progress max="1" value="0.420">',
        rows,
    )
    assert f'<tr data-job="{job_id}">' in viewer.get("/jobs/rows").text
    with catalog.sessions.begin() as session:
        assert cancel_job(session, job_id, Actor.user("web-test"))


def test_study_page_shows_the_timeline_and_links_the_viewer(
    processed: ProcessedStudy, viewer: httpx.Client
) -> None:
    page = viewer.get(f"/studies/{processed.study_uid}").text
    for kind in ("receiving", "stable", "queued", "running", "done"):
        assert f'class="event {kind}"' in page, kind
    stages = re.findall(r'<span class="kv">([a-z]+) \d+\.\d\d s</span>', page)
    ran = [s for s in stages if s in ("queued", "decode", "infer", "build", "store")]
    assert ran == ["queued", "decode", "infer", "build", "store"]  # in the order they ran
    assert f'href="{processed.viewer_path}"' in page
    assert "held" in page  # its deliveries: SOURCE has no address
    assert viewer.get("/studies/1.2.3.999").status_code == 404


def test_viewer_page_has_segments_measurements_pdf_and_pacs_link(
    processed: ProcessedStudy, viewer: httpx.Client
) -> None:
    page = viewer.get(processed.viewer_path).text
    for label in ("Body", "Left lung", "Right lung", "Bone"):
        assert label in page
    assert page.count('class="segment"') == 4
    assert "Volume" in page
    assert "mL" in page  # the SR's measurements
    for name in CT_PRESETS:
        assert f">{name}</button>" in page
    assert 'class="edge left" id="edge-left">R<' in page  # patient's right on screen left
    assert 'class="edge right" id="edge-right">L<' in page
    assert 'class="edge top" id="edge-top">A<' in page
    link = PACS_VIEWER.replace("{study_uid}", processed.study_uid)
    assert f'id="pacs-link" href="{link}"' in page
    pdf = viewer.get(f"{processed.viewer_path}/report.pdf")
    assert pdf.status_code == 200
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF-")
    assert pdf.content.rstrip().endswith(b"%%EOF")
    assert pacs_viewer_link("", processed.study_uid) == ""
    other = viewer.get(f"/studies/1.2.3.999/jobs/{processed.job_id}/viewer")
    assert other.status_code == 404  # the job is not that study's
    unprocessed = viewer.get(processed.viewer_path, params={"series": "1.2.3.999"})
    assert unprocessed.status_code == 404  # nor that series the job's
    assert 'class="series-picker"' not in page  # one series: nothing to pick


def test_viewer_slices_are_windowed_and_labels_sit_on_their_anatomy(
    processed: ProcessedStudy, viewer: httpx.Client
) -> None:
    phantom = processed.phantom
    z = phantom.hu.shape[0] // 2
    base = processed.viewer_path
    soft = png(viewer.get(f"{base}/slices/{z}.png"))
    assert soft.shape == phantom.hu.shape[1:]
    lung = png(viewer.get(f"{base}/slices/{z}.png", params={"wc": -600, "ww": 1500}))
    in_lung = phantom.truth["lung_left"][z]
    assert soft[in_lung].mean() < 5  # lung is black in a soft-tissue window ...
    assert lung[in_lung].mean() > 20  # ... and grey in a lung window
    every = png(viewer.get(f"{base}/labels/{z}.png"))
    assert every.shape == (*phantom.hu.shape[1:], 4)
    # The left lung's colour covers the phantom's left lung, on the screen's right half.
    number, colour = _segments(viewer.get(base).text)["Left lung"]
    only_left = png(viewer.get(f"{base}/labels/{z}.png", params={"segments": number}))
    shown = only_left[..., 3] > 0
    assert dice(shown, in_lung) > 0.85
    assert np.all(only_left[shown][:, :3] == colour)
    assert (every[..., 3] > 0).sum() > shown.sum()  # the other segments too
    assert np.mean(np.nonzero(shown)[1]) > phantom.hu.shape[2] / 2
    assert not png(viewer.get(f"{base}/labels/{z}.png", params={"segments": ""}))[..., 3].any()
    assert viewer.get(f"{base}/slices/{phantom.hu.shape[0]}.png").status_code == 404
    assert viewer.get(f"{base}/labels/0.png", params={"segments": "1;2"}).status_code == 422


def _segments(page: str) -> dict[str, tuple[str, tuple[int, int, int]]]:
    """Each segment's number and colour, as the viewer page's toggles name them."""
    found = re.findall(
        r'class="segment" value="(\d+)" checked> <span class="swatch" '
        r'style="background: #([0-9a-f]{6})"></span> ([^<]+?)</label>',
        page,
    )
    return {
        label: (number, (int(hex_[0:2], 16), int(hex_[2:4], 16), int(hex_[4:6], 16)))
        for number, hex_, label in found
    }


def test_segment_colours_are_the_seg_recommended_ones(
    processed: ProcessedStudy, viewer: httpx.Client
) -> None:
    segments = _segments(viewer.get(processed.viewer_path).text)
    results = processed.node.settings.node.data_dir / "results"
    (seg_path,) = (p for p in results.rglob("*.dcm") if dcmread(p).Modality == "SEG")
    for item in dcmread(seg_path, stop_before_pixels=True).SegmentSequence:
        lab = hd.color.CIELabColor.from_dicom_value(tuple(item.RecommendedDisplayCIELabValue))
        number, colour = segments[str(item.SegmentLabel)]
        assert number == str(item.SegmentNumber)
        assert colour == lab.to_rgb(clip=True)


def test_deliveries_retry_needs_an_operator_and_the_csrf_token(
    processed: ProcessedStudy, viewer: httpx.Client
) -> None:
    catalog = processed.node.catalog
    with catalog.sessions() as session:
        held = [d for d in list_deliveries(session) if d.state == "held"]
    assert held
    target = held[0].id
    page = viewer.get("/deliveries").text
    assert f'<tr data-delivery="{target}">' in page
    assert 'disabled title="operators only"' in page
    cookie, csrf = processed.session(Role.VIEWER)
    with processed.node.client(role=None, cookies=cookies(cookie)) as client:
        refused = client.post(
            f"/deliveries/{target}/retry",
            data={CSRF_FIELD: csrf},
            headers={CSRF_HEADER: csrf},
        )
    assert refused.status_code == 403  # a viewer changes nothing
    cookie, csrf = processed.session(Role.OPERATOR)
    with processed.node.client(role=None, cookies=cookies(cookie)) as operator:
        form = operator.get("/deliveries").text
        assert re.search(
            rf'action="/deliveries/{target}/retry"[^>]*>\s*'
            rf'<input type="hidden" name="{CSRF_FIELD}" value="{re.escape(csrf)}">',
            form,
        )
        assert operator.post(f"/deliveries/{target}/retry").status_code == 403  # no CSRF
        done = operator.post(
            f"/deliveries/{target}/retry", data={CSRF_FIELD: csrf}, headers={CSRF_HEADER: csrf}
        )
        assert done.status_code == 303
        assert done.headers["location"] == f"/deliveries?retried={target}"
        assert "will be sent again" in operator.get(done.headers["location"]).text
        again = operator.post(
            f"/deliveries/{target}/retry", data={CSRF_FIELD: csrf}, headers={CSRF_HEADER: csrf}
        )
        assert again.headers["location"] == f"/deliveries?refused={target}"
    with catalog.sessions() as session:
        (after,) = [d for d in list_deliveries(session) if d.id == target]
    assert after.state == "pending"


def test_models_routes_and_health_pages(processed: ProcessedStudy, viewer: httpx.Client) -> None:
    models = viewer.get("/models").text
    assert 'id="model-ct-classical"' in models
    assert 'id="model-ct-torso-organs"' in models
    assert "Held-out metrics" in models  # the trained bundles' eval/heldout/metrics.json
    assert re.search(r"<td>lung_left</td><td>0\.9\d\d</td>", models)
    assert "<h1>" in models.split('class="markdown"', 1)[1]  # the card, as HTML
    explained = viewer.get("/routes", params={"study_uid": processed.study_uid}).text
    assert "outcome <strong>" in explained
    assert "no study 1.2.3.999" in viewer.get("/routes", params={"study_uid": "1.2.3.999"}).text
    health = viewer.get("/health").text
    for part in ("Disk (data folder)", "Queue", "Last hour", "Rejected associations", "Peers"):
        assert part in health
    assert re.search(r'id="throughput">\d+ instances received, [1-9]\d* jobs done', health)


def test_an_operator_rejects_the_result_in_the_viewer_and_the_model_page_counts_it(
    processed: ProcessedStudy, viewer: httpx.Client
) -> None:
    """Last in this module: it withdraws the shared study's result."""
    page = viewer.get(processed.viewer_path).text
    assert 'id="reject-form"' not in page  # a viewer may look, not decide
    cookie, csrf = processed.session(Role.VIEWER)
    with processed.node.client(role=None, cookies=cookies(cookie)) as client:
        refused = client.post(
            processed.viewer_path + "/reject",
            data={CSRF_FIELD: csrf, "reason": "wrong side"},
        )
    assert refused.status_code == 403
    cookie, csrf = processed.session(Role.OPERATOR)
    with processed.node.client(role=None, cookies=cookies(cookie)) as operator:
        form = operator.get(processed.viewer_path).text
        assert 'id="reject-form"' in form
        assert "Rejected for Patient Safety Reasons (113037, DCM)" in form
        no_csrf = operator.post(processed.viewer_path + "/reject", data={"reason": "x"})
        assert no_csrf.status_code == 403
        done = operator.post(
            processed.viewer_path + "/reject",
            data={CSRF_FIELD: csrf, "reason": "liver outline leaks into the kidney"},
        )
        assert done.status_code == 303
        after = operator.get(done.headers["location"]).text
        assert 'id="review-state"' in after
        assert 'id="reject-form"' not in after  # rejected once, for good
        again = operator.post(
            processed.viewer_path + "/reject", data={CSRF_FIELD: csrf, "reason": "twice"}
        )
        assert again.status_code == 409
    with processed.node.catalog.sessions() as session:
        states = {d.state for d in list_deliveries(session) if d.job_id == processed.job_id}
    assert states <= {"rejected", "delivered"}  # nothing of it goes out any more
    models = viewer.get("/models").text.split('id="model-ct-classical"', 1)[1]
    models = models.split("</section>", 1)[0]
    assert re.search(r'<td class="num">0</td><td class="num">1</td>', models)
