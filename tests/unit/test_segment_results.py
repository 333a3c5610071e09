"""How ``pacs-node segment`` lays result objects out on disk (no model run, no sockets)."""

from __future__ import annotations

from pathlib import Path

from pacs_node.results import OutputKind, ResultSet, StoredObject
from pacs_node.segment import write_results


def _object(kind: OutputKind, uid: str, data: bytes) -> StoredObject:
    return StoredObject(kind, "1.2.3", uid, "1.2.4", "1.2.840.10008.1.2.1", data)


def test_results_are_laid_out_by_kind_and_a_rerun_leaves_nothing_stale(tmp_path: Path) -> None:
    first = ResultSet(
        study_instance_uid="1.2.5",
        findings=(),
        dicom=(
            _object(OutputKind.PDF, "1.9", b"doc"),
            _object(OutputKind.SEG, "1.1", b"seg"),
            _object(OutputKind.KEY_IMAGES, "1.4", b"k1"),
            _object(OutputKind.KEY_IMAGES, "1.5", b"k2"),
        ),
        alternates=(_object(OutputKind.SEG_JPEG2000, "1.1", b"j2k"),),
        pdf=b"%PDF",
        fhir_bundle=b"{}",
    )
    written = write_results(first, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "dicom/seg.dcm",
        "dicom/key-image-01.dcm",
        "dicom/key-image-02.dcm",
        "dicom/pdf.dcm",
        "alternates/seg-jpeg2000.dcm",
        "report.pdf",
        "fhir-bundle.json",
    ]
    assert (tmp_path / "dicom" / "key-image-02.dcm").read_bytes() == b"k2"
    assert (tmp_path / "alternates" / "seg-jpeg2000.dcm").read_bytes() == b"j2k"
    # nothing found this time: only the PDF is left, no stale SEG or key image
    second = ResultSet("1.2.5", (), (_object(OutputKind.PDF, "2.9", b"doc2"),), pdf=b"%PDF2")
    written = write_results(second, tmp_path)
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir()) == ["pdf.dcm"]
    assert not (tmp_path / "alternates").exists()
    assert not list(tmp_path.glob(".*"))  # no staging folders or temporary files left
    assert (tmp_path / "report.pdf").read_bytes() == b"%PDF2"
    assert not (tmp_path / "fhir-bundle.json").exists()
