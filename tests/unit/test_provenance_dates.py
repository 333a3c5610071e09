"""A source date that is not a DICOM date (a dashed birth date from an older system) leaves the
highdicom objects' copy empty, instead of failing every result of the study."""

from __future__ import annotations

import warnings

from pacs_node.results.provenance import utf8_sources
from tests.results_factory import phantom_study


def test_an_invalid_birth_date_is_left_empty_in_highdicom_sources() -> None:
    volume, _, _ = phantom_study(shape=(4, 16, 16))
    with warnings.catch_warnings():  # pydicom judges the value as it is set
        warnings.simplefilter("ignore")
        for header in volume.headers:
            header.PatientBirthDate = "1947-03-21"
            header.StudyDate = "20261205"
    sources = utf8_sources(volume)
    assert {s.PatientBirthDate for s in sources} == {None}  # type 2: present, empty
    assert sources[0].StudyDate == "20261205"  # a valid date is copied
    assert volume.headers[0].PatientBirthDate == "1947-03-21"  # the source is left as it was
