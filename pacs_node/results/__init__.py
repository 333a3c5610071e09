"""Results radiologists and the EHR can use: measurements, DICOM-SEG, TID 1500 SR, presentation
state and key images, a PDF summary and a FHIR Bundle. Pure: arrays, datasets and bytes in and
out; no catalog, no network. :func:`build_results` makes them all once, as stored bytes
(:func:`build_primary`, the SEG and SR first, then :func:`build_extras`).
"""

from __future__ import annotations

from pacs_node.outputs import OutputKind
from pacs_node.results.build import (
    PrimaryResults,
    ResultSet,
    StoredObject,
    build_extras,
    build_primary,
    build_results,
    combine,
)
from pacs_node.results.measurements import Finding, Measurement, Side, measure_labelmap
from pacs_node.results.options import FhirOptions, ResultOptions

__all__ = [
    "FhirOptions",
    "Finding",
    "Measurement",
    "OutputKind",
    "PrimaryResults",
    "ResultOptions",
    "ResultSet",
    "Side",
    "StoredObject",
    "build_extras",
    "build_primary",
    "build_results",
    "combine",
    "measure_labelmap",
]
