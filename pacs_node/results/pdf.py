"""A one-page PDF summary (reportlab): key images with overlays and the measurement table; and
the same bytes as an Encapsulated PDF instance (PS3.3 A.45.1) in the source study.

The table's rows (:func:`table_rows`) name each structure as :attr:`Finding.label` does, the
same words as the key-image legend, the SR and FHIR; every finding's warnings (a left/right
conflict, a structure in several pieces) are printed under the table in red.

Text uses DejaVu Sans when the system has it (accented and most non-Latin names), else
reportlab's bundled Vera (Latin only).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from reportlab.lib import colors  # type: ignore[import-untyped]
from reportlab.lib.pagesizes import A4  # type: ignore[import-untyped]
from reportlab.lib.units import mm  # type: ignore[import-untyped]
from reportlab.lib.utils import ImageReader  # type: ignore[import-untyped]
from reportlab.pdfbase import pdfmetrics  # type: ignore[import-untyped]
from reportlab.pdfbase.ttfonts import TTFont  # type: ignore[import-untyped]
from reportlab.pdfgen import canvas  # type: ignore[import-untyped]

from pacs_node.outputs import OutputKind
from pacs_node.quality.checks import Verdict
from pacs_node.results.measurements import Finding, Measurement, Unmeasured
from pacs_node.results.overlay import DISCLAIMER
from pacs_node.results.provenance import CHARSET, Provenance, copy_patient_study

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
_FONT = "PacsNodeSans"
_FONT_FILES = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf"),
)
_IMAGES_PER_ROW = 2
_MAX_IMAGES = 4
_TABLE_KEYS = (
    "volume",
    "area",
    "intensity_mean",
    "extent_lr",
    "extent_ap",
    "extent_si",
    "max_diameter",
    "sphericity",
    "components",
)


def _font() -> str:
    if _FONT in pdfmetrics.getRegisteredFontNames():
        return _FONT
    import reportlab  # type: ignore[import-untyped]

    candidates = [*_FONT_FILES, Path(reportlab.__file__).parent / "fonts" / "Vera.ttf"]
    for path in candidates:
        if path.exists():
            pdfmetrics.registerFont(TTFont(_FONT, str(path)))
            return _FONT
    return "Helvetica"


def build_pdf(
    findings: Sequence[Finding],
    pictures: Sequence[Image.Image],
    provenance: Provenance,
    *,
    flagged: Verdict | None = None,
) -> bytes:
    """The one-page summary as PDF bytes; ``flagged``: the quality checks the result failed,
    in a red box above the images, so nobody reads the numbers without them."""
    font = _font()
    buffer = io.BytesIO()
    page = canvas.Canvas(buffer, pagesize=A4, invariant=True, pageCompression=1)
    page.setTitle(f"AI result: {provenance.algorithm.name} {provenance.algorithm.version}")
    page.setAuthor("pacs-node")
    page.setCreator("pacs-node")
    width, height = A4
    margin = 15 * mm
    y = height - margin
    source = provenance.source
    page.setFont(font, 15)
    page.drawString(margin, y - 12, "AI segmentation result")
    page.setFillColor(colors.HexColor("#b00000"))
    page.setFont(font, 11)
    page.drawRightString(width - margin, y - 12, DISCLAIMER)
    page.setFillColor(colors.black)
    y -= 30
    page.setFont(font, 9)
    patient = (
        f"Patient: {source.get('PatientName', '')}   ID: {source.get('PatientID', '')}   "
        f"Birth date: {source.get('PatientBirthDate', '')}"
    )
    study = (
        f"Study: {source.get('StudyDescription', '')}   Date: {source.get('StudyDate', '')}   "
        f"Accession: {source.get('AccessionNumber', '')}"
    )
    series = (
        f"Series: {source.get('SeriesDescription', '')} ({provenance.volume.modality})   "
        f"Model: {provenance.algorithm.name} {provenance.algorithm.version}   "
        f"Created: {provenance.created:%Y-%m-%d %H:%M} UTC"
    )
    lines = [patient, study, series]
    basis = size_basis(findings)
    if basis:
        lines.append(basis)
    for text in lines:
        page.drawString(margin, y, text)
        y -= 12
    y -= 4
    if flagged is not None and flagged.failures:
        y = _quality_box(page, font, flagged, margin, y, width - 2 * margin)
    shown = list(pictures)[:_MAX_IMAGES]
    if shown:
        cell = (width - 2 * margin - 5 * mm) / _IMAGES_PER_ROW
        rows = (len(shown) + _IMAGES_PER_ROW - 1) // _IMAGES_PER_ROW
        cell = min(cell, (y - margin - 80 * mm) / rows)
        for i, picture in enumerate(shown):
            col, row = i % _IMAGES_PER_ROW, i // _IMAGES_PER_ROW
            x0 = margin + col * (cell + 5 * mm)
            y0 = y - (row + 1) * cell - row * 3 * mm
            page.drawImage(ImageReader(picture), x0, y0, cell, cell, preserveAspectRatio=True)
        y -= rows * cell + (rows - 1) * 3 * mm + 8 * mm
    _table(page, font, findings, margin, y, width - 2 * margin)
    page.setFont(font, 7)
    page.drawString(
        margin,
        margin - 6,
        "Generated by pacs-node from the model named above; not a diagnosis. "
        "Measurements follow the definitions in the node's documentation.",
    )
    page.showPage()
    page.save()
    return buffer.getvalue()


QUALITY_TITLE = "Quality check failed: read this result with care"


def _quality_box(
    page: canvas.Canvas, font: str, flagged: Verdict, x: float, y: float, width: float
) -> float:
    """A red-framed box naming every failed check; returns the y below it."""
    lines = [
        line
        for failure in flagged.failures
        for line in _wrap(f"- {failure.message}.", font, 8, width - 12)
    ]
    height = 16 + 10 * len(lines) + 6
    page.setStrokeColor(colors.HexColor("#b00000"))
    page.setFillColor(colors.HexColor("#fde8e8"))
    page.setLineWidth(1.5)
    page.rect(x, y - height, width, height, stroke=1, fill=1)
    page.setFillColor(colors.HexColor("#b00000"))
    page.setFont(font, 9.5)
    page.drawString(x + 6, y - 13, QUALITY_TITLE)
    page.setFont(font, 8)
    line_y = y - 26
    for line in lines:
        page.drawString(x + 6, line_y, line)
        line_y -= 10
    page.setFillColor(colors.black)
    page.setStrokeColor(colors.black)
    page.setFont(font, 9)
    return y - height - 8


@dataclass(frozen=True)
class TableRow:
    """One row of the measurement table: a found structure and its formatted values."""

    color: tuple[int, int, int]
    label: str
    values: dict[str, str]  # column label -> formatted value


def table_rows(findings: Sequence[Finding]) -> tuple[list[str], list[TableRow]]:
    """The table's columns and one row per structure found, in the findings' order."""
    present = [f for f in findings if f.present]
    columns: list[str] = []
    for finding in present:
        named: list[Measurement | Unmeasured] = [*finding.unmeasured(), *finding.measurements()]
        for m in named:
            if m.key in _TABLE_KEYS and m.label not in columns:
                columns.append(m.label)
    rows = []
    for finding in present:
        values = {u.label: "not measurable" for u in finding.unmeasured() if u.label in columns}
        values.update(
            {m.label: m.formatted() for m in finding.measurements() if m.label in columns}
        )
        rows.append(TableRow(finding.segment.structure.color, finding.label, values))
    return columns, rows


def size_basis(findings: Sequence[Finding]) -> str:
    """The report line saying where 2D sizes come from, or that they are not measurable."""
    present = [f for f in findings if f.present]
    if any(f.unmeasured() for f in present):
        return (
            "Sizes: not measurable (the image gives no pixel spacing; pixels are not millimetres)"
        )
    basis = next((f.size_basis for f in present if f.size_basis), "")
    return f"Sizes from: {basis}" if basis else ""


def report_warnings(findings: Sequence[Finding]) -> list[str]:
    """Every found structure's warnings, in the findings' order."""
    return [w for f in findings if f.present for w in f.warnings()]


def _table(
    page: canvas.Canvas,
    font: str,
    findings: Sequence[Finding],
    x: float,
    y: float,
    width: float,
) -> None:
    columns, rows = table_rows(findings)
    first = 32 * mm
    step = (width - first) / max(len(columns), 1)
    page.setFont(font, 7.5)
    page.setFillColor(colors.HexColor("#333333"))
    page.drawString(x, y, "Structure")
    for i, label in enumerate(columns):
        page.drawString(x + first + i * step, y, label)
    page.setFillColor(colors.black)
    y -= 11
    for row in rows:
        page.setFillColor(colors.Color(*(c / 255 for c in row.color)))
        page.rect(x, y - 1, 6, 6, stroke=0, fill=1)
        page.setFillColor(colors.black)
        page.drawString(x + 9, y, row.label[:28])
        for i, label in enumerate(columns):
            page.drawString(x + first + i * step, y, row.values.get(label, "-"))
        y -= 10
    absent = [f.segment.structure.display for f in findings if not f.present]
    if absent:
        y -= 4
        page.drawString(x, y, "Not found by the model: " + ", ".join(absent))
        y -= 10
    warnings = report_warnings(findings)
    if warnings:
        y -= 4
        page.setFillColor(colors.HexColor("#b00000"))
        for warning in warnings:
            for line in _wrap(f"Warning: {warning}", font, 7.5, width):
                page.drawString(x, y, line)
                y -= 10
        page.setFillColor(colors.black)


def _wrap(text: str, font: str, size: float, width: float) -> list[str]:
    """Words of ``text`` in lines no wider than ``width`` points."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and pdfmetrics.stringWidth(candidate, font, size) > width:
            lines.append(current)
            candidate = word
        current = candidate
    return [*lines, current] if current else lines


def encapsulate_pdf(pdf: bytes, provenance: Provenance) -> Dataset:
    """The PDF as an Encapsulated PDF instance in the source study (its own series)."""
    ds = Dataset()
    copy_patient_study(provenance.source, ds)
    ds.SpecificCharacterSet = CHARSET
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = provenance.instance_uid(OutputKind.PDF)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = provenance.series_uid(OutputKind.PDF)
    ds.SeriesNumber = provenance.options.series_number(OutputKind.PDF)
    ds.SeriesDescription = provenance.description("AI Report")
    ds.InstanceNumber = provenance.options.instance_number
    ds.Manufacturer = "pacs-node"
    ds.ManufacturerModelName = "pacs-node"
    ds.SoftwareVersions = provenance.software_version
    ds.ConversionType = "WSD"
    created = provenance.created
    ds.ContentDate = ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = created.strftime("%H%M%S")
    ds.AcquisitionDateTime = created.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = f"AI result {provenance.algorithm.name} {provenance.algorithm.version}"[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.ContributingEquipmentSequence = [provenance.contributing_equipment()]
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = provenance.source.SOPClassUID
    source_item.ReferencedSOPInstanceUID = provenance.source.SOPInstanceUID
    ds.SourceInstanceSequence = [source_item]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds
