"""Real files from many vendors and transfer syntaxes (pydicom-data), sent as scanners send them.

What storescu sends is not always the file's bytes (DCMTK re-encodes: group lengths, padding), so
each file also goes to dcmtk's own ``storescp --bit-preserving``; the node must store the data
set exactly as storescp received it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble

from pacs_node.scu import Peer, SendReport, scan, send
from pacs_node.uids import is_valid_uid
from tests.conftest import NodeProcess, clean_env, free_port, storescu, wait_for

pytestmark = pytest.mark.integration

STORESCP = "/usr/bin/storescp"
# storescu's flag that proposes each transfer syntax first, so the file travels unconverted.
PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xk",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xl",
    "1.2.840.10008.1.2.4.81": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def _data_store() -> Path:
    import data_store  # the pydicom-data package

    return Path(data_store.__file__).parent / "data"


def corpus() -> list[tuple[Path, pydicom.Dataset]]:
    """Files pydicom can read whose four identifying UIDs are valid."""
    files = []
    for path in sorted(_data_store().iterdir()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs we skip
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
        if all(ds.get(k) and is_valid_uid(str(ds.get(k))) for k in keys):
            files.append((path, ds))
    return files


def data_set_bytes(path: Path) -> bytes:
    with path.open("rb") as handle:
        read_preamble(handle, False)
        _read_file_meta_info(handle)
        return handle.read()


@pytest.fixture
def bit_preserving_storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [STORESCP, "+B", "+xa", "-od", str(out), "-aet", "PACSNODE", str(port)],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port, out
    finally:
        process.terminate()
        process.wait(10)


def test_every_corpus_file_is_stored_as_sent(
    make_node: Callable[..., NodeProcess],
    tmp_path: Path,
    bit_preserving_storescp: tuple[int, Path],
) -> None:
    files = corpus()
    assert len(files) > 50
    node = make_node()
    reference_port, reference_dir = bit_preserving_storescp
    reference = NodeProcess(root=tmp_path, node={"dicom_port": reference_port})
    sent_as: dict[str, bytes] = {}  # SOP Instance UID -> data set bytes of its first copy
    dcmtk_unreadable: list[Path] = []
    for path, ds in files:
        flag = (PROPOSE.get(str(ds.file_meta.TransferSyntaxUID), "-xe"),)
        uid = str(ds.SOPInstanceUID)
        to_node = storescu(node, path, extra=("-R", *flag))
        if to_node.returncode != 0:
            # DCMTK cannot parse a few deliberately broken files; the node gets them as-is.
            dcmtk_unreadable.append(path)
            report = SendReport()
            send(scan([path], report), Peer("PACSNODE", "127.0.0.1", node.port), "STORESCU", report)
            assert report.ok, (path.name, report.failed)
            sent_as.setdefault(uid, data_set_bytes(path))
            continue
        assert storescu(reference, path, extra=("-R", *flag)).returncode == 0
        received = wait_for(lambda: list(reference_dir.iterdir()), 10, what="storescp's copy")
        assert len(received) == 1
        sent_as.setdefault(uid, data_set_bytes(received[0]))
        os.unlink(received[0])
    assert len(dcmtk_unreadable) <= 4, dcmtk_unreadable

    studies = wait_for(
        lambda: (s := node.studies()) and sum(x["instances"] for x in s) == len(sent_as) and s,
        30,
        what="every distinct instance in the catalog",
    )
    # The corpus holds some instances in several transfer syntaxes: other bytes under a held
    # SOP Instance UID, kept apart in quarantine (resend_policy keep_first); the rest duplicates.
    quarantined = json.loads(node.cli("quarantine", "--json").stdout)
    assert {item["reason"] for item in quarantined} <= {"resend_different_bytes"}
    duplicates = sum(s["duplicate_count"] for s in studies)
    assert duplicates + len(quarantined) == len(files) - len(sent_as)
    spool = node.data_dir / "spool"
    stored = {p.stem: p for p in spool.rglob("*.dcm") if ".quarantine" not in p.parts}
    assert set(stored) == set(sent_as)
    mismatched = [uid for uid, body in sent_as.items() if data_set_bytes(stored[uid]) != body]
    assert mismatched == []
    shutil.rmtree(reference_dir, ignore_errors=True)


CHARSET_FILES = [
    "chrFren.dcm",  # ISO_IR 100
    "chrGerm.dcm",  # ISO_IR 100
    "chrH31.dcm",  # ISO 2022 IR 87 (Japanese)
    "chrH32.dcm",  # ISO 2022 IR 13 + IR 87
    "chrI2.dcm",  # ISO 2022 IR 149 (Korean)
    "chrKoreanMulti.dcm",
    "chrX1.dcm",  # ISO_IR 192 (UTF-8)
    "chrX2.dcm",  # GB18030
    "chrGreek.dcm",
    "chrRuss.dcm",
    "chrArab.dcm",
    "chrHbrw.dcm",
]


def test_names_in_every_character_set_reach_the_catalog_readable(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node()
    expected: dict[str, str] = {}
    for name in CHARSET_FILES:
        path = Path(pydicom.data.get_charset_files(name)[0])
        ds = pydicom.dcmread(path)
        expected.setdefault(str(ds.StudyInstanceUID), str(ds.PatientName))
        assert storescu(node, path, extra=("-R",)).returncode == 0, name
    studies = wait_for(
        lambda: len(s := node.studies()) == len(expected) and s, 20, what="all studies"
    )
    names = {s["study_uid"]: s["patient_name"] for s in studies}
    assert names == expected
    assert (
        names["1.3.6.1.4.1.5962.1.2.0.1175775771.5702.0"] == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    )
