"""One decoded frame as a consumer image (PNG or JPEG), as DICOMweb's rendered resources give
it (PS3.18 8.3.5.1): the Modality LUT (rescale), a grey-level window (the one asked for, else
the header's first, else the frame's own range), MONOCHROME1 shown inverted; colour frames as
they are."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut

from pacs_node.imaging.preprocess import window

PNG = "image/png"
JPEG = "image/jpeg"
MEDIA_TYPES = (PNG, JPEG)
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Window:
    """A grey-level window: centre and width in modality (rescaled) values."""

    center: float
    width: float


def header_window(header: Dataset) -> Window | None:
    """The first window the header carries, if any."""
    center, width = header.get("WindowCenter"), header.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    first_c = _first(center)
    first_w = _first(width)
    return Window(float(first_c), max(float(first_w), 1.0))


def _first(value: Any) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return value[0]
    return value


def render(
    frame: NDArray[Any], header: Dataset, media_type: str = PNG, chosen: Window | None = None
) -> bytes:
    """``frame`` (as pydicom decodes it: colour already RGB) encoded as ``media_type``."""
    if media_type not in MEDIA_TYPES:
        raise ValueError(f"cannot render as {media_type}")
    if frame.ndim == 3:  # RGB
        pixels = frame
        bits = int(header.get("BitsStored", 8) or 8)
        if bits > 8:
            pixels = frame.astype(np.float32) * (255.0 / float(2**bits - 1))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    else:
        values = np.asarray(apply_modality_lut(frame, header), dtype=np.float32)
        span = chosen or header_window(header) or _range_window(values)
        grey = window(values, span.center, span.width)
        if str(header.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            grey = 1.0 - grey
        image = Image.fromarray(np.rint(grey * 255.0).astype(np.uint8), mode="L")
    out = io.BytesIO()
    if media_type == PNG:
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _range_window(values: NDArray[np.float32]) -> Window:
    low, high = float(values.min()), float(values.max())
    return Window((low + high) / 2.0, max(high - low, 1.0))
