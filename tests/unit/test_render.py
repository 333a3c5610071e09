"""Rendering a frame for DICOMweb's rendered resources: rescale, window, MONOCHROME1, formats."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset

from pacs_node.imaging.render import JPEG, PNG, Window, header_window, render
from pacs_node.web.accept import parse_accept


def _header(photometric: str = "MONOCHROME2", **attributes: object) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1000
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_the_window_applies_to_rescaled_values_and_monochrome1_is_inverted() -> None:
    frame = np.array([[0, 1000, 2000]], dtype=np.uint16)  # -1000, 0, 1000 after rescale
    header = _header(WindowCenter=0, WindowWidth=1000)
    assert header_window(header) == Window(0.0, 1000.0)
    assert _pixels(render(frame, header)).tolist() == [[0, 128, 255]]
    inverted = render(frame, _header("MONOCHROME1", WindowCenter=0, WindowWidth=1000))
    assert _pixels(inverted).tolist() == [[255, 128, 0]]
    # a window asked for wins over the header's; without either, the frame's own range
    assert _pixels(render(frame, header, PNG, Window(-500, 10))).tolist() == [[0, 255, 255]]
    assert _pixels(render(frame, _header())).tolist() == [[0, 128, 255]]


def test_colour_frames_and_formats() -> None:
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    image = Image.open(io.BytesIO(render(rgb, _header("RGB"), JPEG)))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (6, 4))
    with pytest.raises(ValueError, match="cannot render"):
        render(rgb, _header("RGB"), "image/gif")


def test_accept_headers_are_read_in_order_of_preference() -> None:
    ranges = parse_accept(
        'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50; q=0.5, '
        'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    )
    assert [(r.part_type, r.transfer_syntax) for r in ranges] == [
        ("application/octet-stream", "*"),
        ("image/jpeg", "1.2.840.10008.1.2.4.50"),
    ]
    assert [r.media_type for r in parse_accept(None)] == ["*/*"]
    assert parse_accept("image/png;q=0") == []
