"""The picture a radiologist would see of a result on a real image (the node's own key-image
rendering), kept beside a test's output and, with ``PACS_NODE_WRITE_DOCS_IMAGES=1``, written to
the README's ``docs/img/`` so the README shows what the tests saw."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pacs_node.imaging.volume import Volume
from pacs_node.inference.runner import Segmentation
from pacs_node.results import ResultOptions, measure_labelmap
from pacs_node.results.overlay import render_slice
from pacs_node.results.provenance import Provenance

DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "img"


def save_overlay(
    volume: Volume, segmentation: Segmentation, folder: Path, name: str, z: int | None = None
) -> Path:
    """Slice ``z`` (default: the one with the most labelled voxels besides the body) with the
    labels' contours and legend, as ``folder/name``; returns that path."""
    labelmap = segmentation.labelmap
    if z is None:
        labels = np.asarray(labelmap.labels)
        organs = [s.value for s in labelmap.segments if s.name != "body"]
        z = int(np.argmax(np.isin(labels, organs).sum(axis=(1, 2))))
    findings = measure_labelmap(volume, labelmap)
    provenance = Provenance.of(volume, labelmap, segmentation.model, ResultOptions())
    picture = render_slice(volume, labelmap, z, findings, provenance)
    picture.thumbnail((700, 700))
    path = folder / name
    picture.save(path)
    if os.environ.get("PACS_NODE_WRITE_DOCS_IMAGES") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        picture.save(DOCS_IMAGES / name, optimize=True)
    return path
