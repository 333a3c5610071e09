"""The shipped lung model on a real chest radiograph: RG1_UNCR from pydicom-data (PA, CR,
MONOCHROME1, 1955 x 1841, Pixel Spacing 0), run as ``pacs-node segment`` runs it.

Sides are judged from the file's Patient Orientation (0020,0020) read with plain pydicom (PS3.3
C.7.6.1.1.1: the first value is the patient direction along which the column index grows), not
with the node's side code, and the picture a radiologist would see is kept as an artifact."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from pacs_node.imaging import load_series
from pacs_node.inference.registry import Registry
from pacs_node.inference.runner import Runner
from pacs_node.results import ResultOptions, measure_labelmap
from pacs_node.results.overlay import render_slice
from pacs_node.results.provenance import Provenance
from pacs_node.segment import segment_paths

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
README_IMAGE = ROOT / "docs" / "img" / "xr-chest-lungs-rg1.png"


def test_rg1_gets_both_lung_fields_on_the_patients_own_sides(tmp_path: Path) -> None:
    rg1 = Path(get_testdata_file("RG1_UNCR.dcm"))  # type: ignore[arg-type]
    ds = pydicom.dcmread(rg1, stop_before_pixels=True)
    toward = str(ds.PatientOrientation[0]).upper()[:1]
    assert toward in ("L", "R"), ds.PatientOrientation
    left_sign = 1.0 if toward == "L" else -1.0  # +1: higher columns lie to the patient's left
    centre = (int(ds.Columns) - 1) / 2

    report = segment_paths(Runner(Registry(MODELS), threads=2), "xr-chest-lungs", [rg1], tmp_path)
    labelmap = report.segmentation.labelmap
    labels = np.asarray(labelmap.labels[0])
    assert labels.shape == (ds.Rows, ds.Columns)
    values = {s.name: s.value for s in labelmap.segments}
    for name, side in (("lung_left", 1.0), ("lung_right", -1.0)):
        rows, cols = np.nonzero(labels == values[name])
        share = rows.size / labels.size
        assert 0.08 < share < 0.30, (name, share)  # a lung field: about a tenth to a quarter
        toward_own_side = (cols - centre) * left_sign * side
        assert np.mean(toward_own_side > 0) > 0.97, name  # in the patient's own half
        assert float(np.mean(toward_own_side)) > 0.1 * ds.Columns, name  # not at the midline
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert 0.35 * ds.Rows < height < 0.85 * ds.Rows, (name, height)
        assert 0.15 * ds.Columns < width < 0.5 * ds.Columns, (name, width)
        assert height > width, name  # taller than wide, as a lung field on a PA film
        assert rows.size > 0.5 * height * width, name  # one solid field, not streaks
    # the node's own side check agrees: no conflict with Patient Orientation, no size given
    volume = load_series([rg1])
    findings = measure_labelmap(volume, labelmap)
    assert {f.segment.name for f in findings if f.present} == {"lung_left", "lung_right"}
    assert not any(f.side_conflict for f in findings)
    assert all(f.area_cm2 is None for f in findings)
    assert report.verdict.passed, report.verdict.sentences()  # the gate lets it through

    # what a radiologist sees on the key image, kept beside the test's output
    provenance = Provenance.of(volume, labelmap, report.segmentation.model, ResultOptions())
    picture = render_slice(volume, labelmap, 0, findings, provenance)
    picture.thumbnail((900, 900))
    artifact = tmp_path / "rg1-overlay.png"
    picture.save(artifact)
    assert artifact.stat().st_size > 10_000
    if os.environ.get("PACS_NODE_WRITE_DOCS_IMAGES") == "1":  # refresh the README's picture
        README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        picture.save(README_IMAGE, optimize=True)
