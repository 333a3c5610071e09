"""``pacs-node segment`` writes every result object as a file that passes dciodvfy and reads back
with highdicom; a real Orthanc takes them all over C-STORE and over STOW-RS (each leg on its own
fresh server), and its QIDO-RS finds every series and WADO-RS gives every instance back intact."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset, dcmread
from pydicom.uid import JPEG2000Lossless

from pacs_node.inference.vocabulary import structure
from pacs_node.scu import Peer, SendReport, scan, send
from tests.conftest import PACS_NODE, clean_env
from tests.ct_phantom import make_ct_phantom, write_phantom_series
from tests.orthanc import OrthancProcess, orthanc, orthanc_with_dicomweb  # noqa: F401 (fixture)

MODELS = Path(__file__).resolve().parents[2] / "models"
DCIODVFY = "/usr/bin/dciodvfy"
ALLOWED_WARNINGS = (
    "Device UID",  # Contributing Equipment > Device UID: newer than dciodvfy's dictionary
    "Standard Extended SOP Class",  # follows from the Device UID above
    "<99PACSNODE>",  # our private coding scheme, declared in the SR
    "attribute <Laterality>",  # empty type 2C Laterality: the source states none
    "needed to build DICOMDIR",  # the phantom has no Study Date, Time or ID: copied empty
)
# Modality of each result series as QIDO-RS lists it.
MODALITIES = {"SEG", "SR", "PR", "OT", "DOC"}


@dataclass(frozen=True)
class Segmented:
    sources: list[Path]
    out: Path
    report: dict[str, Any]

    @property
    def primary(self) -> list[Path]:
        return sorted((self.out / "dicom").iterdir())

    @property
    def jpeg2000_seg(self) -> Path:
        return self.out / "alternates" / "seg-jpeg2000.dcm"

    @property
    def source_uids(self) -> set[str]:
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.sources}


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> Segmented:
    root = tmp_path_factory.mktemp("segment")
    phantom = make_ct_phantom(7, shape=(8, 96, 96), spacing=(6.0, 4.0, 4.0))
    sources = write_phantom_series(phantom, root / "series")
    out = root / "out"
    run = subprocess.run(
        [PACS_NODE, "segment", "ct-classical", str(root / "series"), "--out", str(out),
         "--models-dir", str(MODELS), "--jpeg2000", "--json"],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return Segmented(sources, out, json.loads(run.stdout))


def dciodvfy_warnings(path: Path) -> list[str]:
    run = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, (path.name, errors)
    return [line for line in lines if line.startswith("Warning")]


def check_seg(seg: hd.seg.Segmentation, segmented: Segmented) -> None:
    """Segments, their codes and the referenced source images are those of the run."""
    labels = json.loads((segmented.out / "labels.json").read_text())
    names = {key: name for key, name in labels.items() if key.isdigit()}  # not "quality"
    assert seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == len(names)
    for number, name in enumerate(names.values(), start=1):
        description = seg.get_segment_description(number)
        expected = structure(name)
        assert description.segmented_property_type.value == expected.type.value
        assert description.segmented_property_category.value == expected.category.value
        algorithm = description.algorithm_identification
        assert algorithm is not None
        assert algorithm[0].AlgorithmName == "ct-classical"
    assert {uid for _, _, uid in seg.get_source_image_uids()} == segmented.source_uids


def test_segment_writes_every_result_object(segmented: Segmented) -> None:
    out = segmented.out
    names = [p.name for p in segmented.primary]
    key_images = [n for n in names if n.startswith("key-image-")]
    assert 1 <= len(key_images) <= 4
    assert sorted(names) == sorted(["seg.dcm", "sr.dcm", "gsps.dcm", "pdf.dcm", *key_images])
    expected = [*segmented.primary, segmented.jpeg2000_seg, out / "report.pdf"]
    assert {str(p) for p in [*expected, out / "fhir-bundle.json"]} == set(
        segmented.report["results"]
    )
    study = str(dcmread(segmented.sources[0], stop_before_pixels=True).StudyInstanceUID)
    for path in [*segmented.primary, segmented.jpeg2000_seg]:
        unexpected = [
            w for w in dciodvfy_warnings(path) if not any(a in w for a in ALLOWED_WARNINGS)
        ]
        assert not unexpected, (path.name, unexpected)
        ds = dcmread(path)
        assert ds.StudyInstanceUID == study  # results go into the source study
        assert ds.SpecificCharacterSet == "ISO_IR 192"
    # the SEG in both encodings: codes, references and pixels equal the labels written
    image: Any = nib.load(out / "labels.nii.gz")
    labels = np.asarray(image.dataobj).transpose(2, 1, 0)
    order = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in segmented.sources]
    positions = [
        float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
        for p in segmented.sources
    ]
    by_z = [uid for _, uid in sorted(zip(positions, order, strict=True))]
    for path in (out / "dicom" / "seg.dcm", segmented.jpeg2000_seg):
        seg = hd.seg.Segmentation.from_dataset(dcmread(path))
        check_seg(seg, segmented)
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=by_z, combine_segments=True, relabel=False
        )
        assert np.array_equal(pixels, labels)
    assert dcmread(segmented.jpeg2000_seg).file_meta.TransferSyntaxUID == JPEG2000Lossless
    # the SR measures each segment of that SEG
    seg_uid = str(dcmread(out / "dicom" / "seg.dcm", stop_before_pixels=True).SOPInstanceUID)
    sr = hd.sr.Comprehensive3DSR.from_dataset(dcmread(out / "dicom" / "sr.dcm"))
    content: Any = sr.content  # a MeasurementReport
    groups = content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 4
    for group in groups:
        ref = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg_uid
    # presentation state and key images point at the source images
    gsps = dcmread(out / "dicom" / "gsps.dcm")
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in gsps.ReferencedSeriesSequence
        for item in series.ReferencedImageSequence
    }
    assert referenced == segmented.source_uids
    for name in key_images:
        image = dcmread(out / "dicom" / name)
        assert image.SourceImageSequence[0].ReferencedSOPInstanceUID in segmented.source_uids
        assert image.pixel_array.shape[-1] == 3
    # the PDF as a file and encapsulated; the FHIR Bundle validates as R4B
    pdf = (out / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    document = dcmread(out / "dicom" / "pdf.dcm")
    assert document.EncapsulatedDocument[: document.EncapsulatedDocumentLength] == pdf
    bundle = Bundle.model_validate_json((out / "fhir-bundle.json").read_bytes())
    assert bundle.type == "transaction"


def test_segment_without_results_writes_labels_only(tmp_path: Path) -> None:
    phantom = make_ct_phantom(3, shape=(4, 48, 48), spacing=(6.0, 8.0, 8.0), sub=1)
    write_phantom_series(phantom, tmp_path / "series")
    out = tmp_path / "out"
    run = subprocess.run(
        [PACS_NODE, "segment", "ct-classical", str(tmp_path / "series"), "--out", str(out),
         "--models-dir", str(MODELS), "--no-results", "--json"],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["results"] == []
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "labels.nii.gz"]


def check_dicomweb(server: OrthancProcess, files: list[Path], segmented: Segmented) -> None:
    """QIDO-RS lists every result series; WADO-RS returns each instance as it was stored."""
    originals = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in files)}
    study = str(next(iter(originals.values())).StudyInstanceUID)
    client = DICOMwebClient(url=server.dicomweb_url)
    found = client.search_for_series(study_instance_uid=study)
    modalities = {Dataset.from_json(s).Modality for s in found}
    assert modalities == MODALITIES
    series = {str(Dataset.from_json(s).SeriesInstanceUID) for s in found}
    assert series == {str(ds.SeriesInstanceUID) for ds in originals.values()}
    listed = {
        str(Dataset.from_json(i).SOPInstanceUID)
        for i in client.search_for_instances(study_instance_uid=study)
    }
    assert listed == set(originals)
    for uid, original in originals.items():
        retrieved = client.retrieve_instance(
            study,
            str(original.SeriesInstanceUID),
            uid,
            media_types=(("application/dicom", "*"),),  # as stored, not transcoded
        )
        syntax = original.file_meta.TransferSyntaxUID
        assert retrieved.file_meta.TransferSyntaxUID == syntax, original.Modality
        assert retrieved == original, original.Modality  # every element, pixel bytes included
        if original.Modality == "SEG":
            check_seg(hd.seg.Segmentation.from_dataset(retrieved), segmented)


def test_orthanc_takes_results_over_c_store(
    segmented: Segmented,
    orthanc: OrthancProcess,  # noqa: F811 (the fixture imported above)
) -> None:
    # the JPEG 2000 SEG, as a dispatcher may choose it, proposed in its own transfer syntax
    files = [p for p in segmented.primary if p.name != "seg.dcm"] + [segmented.jpeg2000_seg]
    report = SendReport()
    send(scan(files, report), Peer("ORTHANC", "127.0.0.1", orthanc.dicom_port), "PACSNODE", report)
    assert report.ok, report.failed
    assert report.sent == len(files)
    assert len(orthanc.get("/instances")) == len(files)
    check_dicomweb(orthanc, files, segmented)


def test_orthanc_takes_results_over_stow_rs(segmented: Segmented, tmp_path: Path) -> None:
    server = orthanc_with_dicomweb(tmp_path / "orthanc-stow").start()
    try:
        files = segmented.primary
        client = DICOMwebClient(url=server.dicomweb_url)
        response = client.store_instances([dcmread(p) for p in files])
        assert not response.get("FailedSOPSequence"), response
        assert len(response.ReferencedSOPSequence) == len(files)
        check_dicomweb(server, files, segmented)
    finally:
        server.stop()
