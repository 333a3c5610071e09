"""Pixels and geometry: a DICOM series becomes a Volume, gets resampled for a model, and the
model's output comes back to the source grid. Pure functions over numpy arrays and header-only
pydicom datasets; no catalog, no network, no torch.
"""

from __future__ import annotations

from pacs_node.imaging.volume import Dropped, Grid, Volume, VolumeKind, load_series

__all__ = ["Dropped", "Grid", "Volume", "VolumeKind", "load_series"]
