"""Files on a disk read as the node would read them once received: grouped by UIDs, a repeated
SOP Instance UID counted once, a Series UID held by another study refused, the leading header
chosen by Instance Number (not by file name), anything else skipped with a reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

from pacs_node.routing.files import read_studies
from tests.dicom_factory import new_uid, restyle, write_series


def test_files_are_grouped_and_read_as_the_node_would(tmp_path: Path) -> None:
    study = new_uid()
    paths = write_series(tmp_path / "ct", slices=20, study_uid=study, series_number=2)
    # The instance numbered 1 sits in the last file: it, not the first file, leads the series.
    for index, path in enumerate(paths):
        restyle([path], InstanceNumber=20 - index)
    restyle(paths[-1:], SeriesDescription="CT THORAX", BodyPartExamined=None)
    restyle(paths[:-1], BodyPartExamined=None)
    shutil.copy(paths[0], tmp_path / "ct" / "zz-again.dcm")  # the same instance twice
    stray = write_series(tmp_path / "stray", slices=1, study_uid=new_uid())
    restyle(stray, SeriesInstanceUID=pydicom.dcmread(paths[0]).SeriesInstanceUID)
    (tmp_path / "notes.txt").write_text("not DICOM")

    studies, skipped = read_studies([tmp_path], calling_ae="CT1")

    (found,) = studies
    assert (found.study_uid, found.instances) == (study, 20)
    (series,) = found.series
    assert (series.slices, series.series_number, series.calling_ae) == (20, 2, "CT1")
    assert series.series_description == "CT THORAX"
    assert str(series.body_region) == "CHEST (series description 'CT THORAX')"
    assert series.body_region.regions == ("CHEST",)
    reasons = {path.name: reason for path, reason in ((s.path, s.reason) for s in skipped)}
    assert reasons["notes.txt"] == "not a Part 10 file"
    assert reasons["zz-again.dcm"].startswith("same SOP Instance UID as ")
    assert reasons[stray[0].name].startswith(f"its Series Instance UID belongs to study {study}")
    assert len(skipped) == 3


def test_a_path_that_is_not_there_is_a_note(tmp_path: Path) -> None:
    studies, skipped = read_studies([tmp_path / "missing.dcm"])
    assert studies == []
    assert [s.reason for s in skipped] == ["no such file"]
