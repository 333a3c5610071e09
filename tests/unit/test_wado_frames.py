"""WADO-RS frames read lazily: each part reads its own frame from the stored file when it is
sent (native at its offset, encapsulated through the Basic or Extended Offset Table or the
fragments' item headers), never the whole Pixel Data; a repeated frame is sent once."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate_extended, generate_frames, get_frame

from pacs_node.services import wado
from pacs_node.services.archive import StoredObject

ASKED = [7, 2, 7, 9, 2]
SENT = [7, 2, 9]


class _Counting:
    """A read-only file handle that records how many bytes each read returned."""

    def __init__(self, handle: io.BufferedReader, reads: list[int]) -> None:
        self.handle, self.reads = handle, reads

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.reads.append(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def __enter__(self) -> _Counting:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.handle.close()


def _with_extended_offsets(tmp_path: Path) -> Path:
    """The RLE test file re-encapsulated with an Extended Offset Table (and no BOT)."""
    ds = dcmread(get_testdata_file("emri_small_RLE.dcm"))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
        frames
    )
    path = tmp_path / "eot.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(params=["native", "rle-bot", "j2k-no-bot", "rle-eot"])
def stored(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    names = {
        "native": "emri_small.dcm",
        "rle-bot": "emri_small_RLE.dcm",
        "j2k-no-bot": "emri_small_jpeg_2k_lossless.dcm",
    }
    if request.param == "rle-eot":
        return _with_extended_offsets(tmp_path)
    return Path(str(get_testdata_file(names[request.param])))


def _expected(path: Path) -> list[bytes]:
    ds = dcmread(path)
    count = int(ds.NumberOfFrames)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return [get_frame(ds.PixelData, i, number_of_frames=count) for i in range(count)]
    size = len(ds.PixelData) // count
    return [ds.PixelData[i * size : (i + 1) * size] for i in range(count)]


def test_each_frame_is_read_once_and_only_when_sent(
    stored: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = dcmread(stored, stop_before_pixels=True)
    obj = StoredObject(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        encodings=((str(ds.file_meta.TransferSyntaxUID), stored),),
        produced=False,
    )
    expected = _expected(stored)
    count = len(expected)
    whole = sum(map(len, expected))
    reads: list[int] = []
    real_open = Path.open

    def counting_open(self: Path, *args: Any, **kwargs: Any) -> _Counting:
        return _Counting(real_open(self, *args, **kwargs), reads)

    monkeypatch.setattr(Path, "open", counting_open)
    parts = wado.frames(obj, ASKED, [("*/*", "*")])
    assert len(parts) == len(SENT)
    assert sum(reads) == 0  # nothing is read before the parts are sent
    for part, number in zip(parts, SENT, strict=True):
        before = sum(reads)
        chunks: Iterator[bytes] = part.chunks
        data = b"".join(chunks)
        assert data == expected[number - 1]
        # read now, from the file: the frame itself and at most the item headers around it
        assert len(data) <= sum(reads) - before <= len(data) + 16 * (count + 2)
        assert sum(reads) - before < whole / 2
