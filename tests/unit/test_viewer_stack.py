"""The viewer's pure parts: which way each screen edge faces for a slice shown as stored, the
window of an image without CT presets, the PNGs of a slice, and the bounded stack cache."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset

from pacs_node.outputs import OutputKind
from pacs_node.services.viewer import (
    CT_PRESETS,
    EdgeLetters,
    JobFiles,
    NoSuchResult,
    SegmentLegend,
    StackCache,
    ViewerStack,
    edge_letters,
    image_edge_letters,
)


def _direction(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    return np.column_stack([row, col, np.cross(row, col)])


@pytest.mark.parametrize(
    ("orientation", "edges"),
    [
        ((1, 0, 0, 0, 1, 0), EdgeLetters("R", "L", "A", "P")),  # axial, as scanners store it
        ((-1, 0, 0, 0, 1, 0), EdgeLetters("L", "R", "A", "P")),  # axial stored flipped
        ((1, 0, 0, 0, 0, -1), EdgeLetters("R", "L", "S", "I")),  # coronal
        ((0, 1, 0, 0, 0, -1), EdgeLetters("A", "P", "S", "I")),  # sagittal
        ((0.8, 0.6, 0, -0.6, 0.8, 0), EdgeLetters("RA", "LP", "AL", "PR")),  # oblique
    ],
)
def test_edge_letters_name_the_patient_direction_of_each_edge(
    orientation: tuple[float, ...], edges: EdgeLetters
) -> None:
    assert edge_letters(_direction(orientation)) == edges


def test_a_radiograph_edges_come_from_its_patient_orientation() -> None:
    chest = Dataset()
    chest.PatientOrientation = ["L", "F"]  # a PA chest: patient's left on the right
    assert image_edge_letters(chest) == EdgeLetters("R", "L", "H", "F")
    chest.PatientOrientation = ["P", "FL"]
    assert image_edge_letters(chest) == EdgeLetters("A", "P", "HR", "FL")
    assert image_edge_letters(Dataset()) == EdgeLetters("", "", "", "")


def _stack(modality: str, voxels: np.ndarray, key: tuple[int, ...] = (1,)) -> ViewerStack:
    labels = np.zeros(voxels.shape, dtype=np.uint16)
    labels[:, 0, 0] = 1
    labels[:, -1, -1] = 2
    return ViewerStack(
        key=key,
        voxels=voxels,
        labels=labels,
        segments=(SegmentLegend(1, "one", (255, 0, 0)), SegmentLegend(2, "two", (0, 0, 255))),
        modality=modality,
        pixel_spacing=(1.0, 1.0),
        edges=EdgeLetters("R", "L", "A", "P"),
        auto_window=(float(voxels.mean()), float(np.ptp(voxels)) or 1.0),
    )


def test_ct_offers_named_presets_and_other_images_their_own_window() -> None:
    voxels = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4)
    ct = _stack("CT", voxels)
    assert ct.presets() == CT_PRESETS
    assert ct.default_window() == CT_PRESETS["soft tissue"]
    mr = _stack("MR", voxels)
    assert mr.presets() == {"auto": mr.auto_window}
    assert mr.default_window() == mr.auto_window


def test_slices_are_windowed_and_labels_coloured_per_shown_segment() -> None:
    voxels = np.array([[[-1000, 0], [40, 1000]]], dtype=np.int16)
    stack = _stack("CT", voxels)
    grey = np.asarray(Image.open(io.BytesIO(stack.slice_png(0, 40, 400))))
    assert grey.tolist() == [[0, 102], [128, 255]]  # below, inside and above the window
    rgba = np.asarray(Image.open(io.BytesIO(stack.labels_png(0, [2]))))
    assert rgba[0, 0].tolist() == [0, 0, 0, 0]  # segment 1 left out
    assert rgba[1, 1].tolist() == [0, 0, 255, 255]  # segment 2 in its colour, opaque
    assert rgba[0, 1].tolist() == [0, 0, 0, 0]  # no segment
    every = np.asarray(Image.open(io.BytesIO(stack.labels_png(0))))
    assert every[0, 0].tolist() == [255, 0, 0, 255]
    with pytest.raises(NoSuchResult):
        stack.slice_png(1, 40, 400)


def test_the_cache_is_bounded_and_reloads_a_rerun_job() -> None:
    loads: list[tuple[int, tuple[int, ...]]] = []

    def files(job_id: int, attempt: int) -> JobFiles:
        return JobFiles(
            job_id, "1.2", "m", "done", "1.2.3", ("1.2.3",), (Path("x"),), {}, (job_id, attempt)
        )

    def load(found: JobFiles) -> ViewerStack:
        loads.append((found.job_id, found.key))
        return _stack("CT", np.zeros((1, 2, 2), np.int16), key=found.key)

    cache = StackCache(size=2)
    cache.get(files(1, 1), load)
    cache.get(files(1, 1), load)
    assert len(loads) == 1  # paging through one job decodes it once
    cache.get(files(2, 1), load)
    cache.get(files(3, 1), load)  # job 1 is the least recently used: dropped
    cache.get(files(1, 1), load)
    assert len(loads) == 4
    cache.get(files(1, 2), load)  # a re-run: new results, loaded afresh
    assert loads[-1] == (1, (1, 2))


def test_a_pdf_is_the_one_at_its_series_place_in_the_job() -> None:
    pdfs = (Path("first.dcm"), Path("second.dcm"))
    shown = JobFiles(1, "1.2", "m", "done", "1.2.4", ("1.2.3", "1.2.4"), (), {"pdf": pdfs}, ())
    assert shown.of_series(OutputKind.PDF) == (Path("second.dcm"),)
    first = JobFiles(1, "1.2", "m", "done", "1.2.3", ("1.2.3", "1.2.4"), (), {"pdf": pdfs}, ())
    assert first.of_series(OutputKind.PDF) == (Path("first.dcm"),)
    assert first.of_series(OutputKind.SEG) == ()
