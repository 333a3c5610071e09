"""Results radiologists and the EHR can use: measurements, DICOM-SEG, TID 1500 SR, presentation
state and key images, a PDF summary and a FHIR Bundle. Pure: arrays, datasets and bytes in and
out; no catalog, no network. :func:`build_results` makes them all once, as stored bytes.
"""

from __future__ import annotations

from pacs_node.outputs import OutputKind
from pacs_node.results.build import ResultSet, StoredObject, build_results
from pacs_node.results.measurements import Finding, Measurement, Side, measure_labelmap
from pacs_node.results.options import FhirOptions, ResultOptions

__all__ = [
    "FhirOptions",
    "Finding",
    "Measurement",
    "OutputKind",
    "ResultOptions",
    "ResultSet",
    "Side",
    "StoredObject",
    "build_results",
    "measure_labelmap",
]
