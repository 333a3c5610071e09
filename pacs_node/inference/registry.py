"""Model bundles under ``models/<name>/``, in the MONAI bundle layout, validated when loaded.

A bundle is a folder::

    <name>/configs/metadata.json    MONAI metadata: version, network_data_format (labels), ...
    <name>/configs/inference.json   network_def, preprocessing, inferer (read by ConfigParser)
    <name>/models/model.pt          state dict for network_def   (or models/model.ts, TorchScript)
    <name>/docs/README.md           the model card

Everything the node needs comes from the standard keys, so a MONAI Model Zoo bundle runs as
dropped in. What the standard keys cannot say lives in an optional ``"pacs_node"`` object in
metadata.json; every key in it is optional::

    "pacs_node": {
      "kind": "network",                 # or "classical": no weights, see inference/classical.py
      "algorithm": "ct-body-lungs-bone", # classical only: which classical algorithm
      "modalities": ["CT"],              # default: network_data_format.inputs.image.modality
      "min_slices": 8,                   # default: 8 for a 3D network, 1 otherwise
      "labels": {"1": "spleen",          # channel -> vocabulary name, or an object that
                 "2": {"name": "pancreas", "type": ["15776009", "Pancreas"],
                       "color": [230, 180, 100]}},  # names a structure outside the vocabulary
      "preprocessing": {                 # replaces inference.json's preprocessing when present
        "spacing_zyx_mm": [2.0, 1.5, 1.5], "orientation": "RAS",
        "intensity": {"kind": "range", "a_min": -57, "a_max": 164}},  # or window / zscore /
                                         # percentile {"lower": 1, "upper": 99} (the image's own)
      "patch_size": [96, 96, 96],        # network (x, y, z); default: the inferer's roi_size
      "overlap": 0.25, "sw_batch_size": 1,
      "cleanup": {"1": {"largest_component": true, "fill_holes": true, "min_volume_ml": 1}},
      "anatomy": {"body": "body",        # anatomical limits, before the clean-up: see
                  "confine_to_body": true,  # inference/anatomy.py; label names, not values
                  "air_only": ["lung_left", "lung_right"], "air_hu_max": -400,
                  "exclude_table": true},
      "queue": "gpu"                     # the device class whose workers run it (Celery job
                                         # queue: one broker queue per class); default "cpu"
    }

Label names: a ``channel_def`` name is matched to the vocabulary after normalising case,
spaces and hyphens and a short alias table (``"left kidney"`` -> ``kidney_left``). A name that
neither matches nor is mapped in ``pacs_node.labels`` is refused at load, naming the file and
key: inventing codes for an unknown structure would put a wrong SNOMED CT code into the PACS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from pacs_node.errors import BundleError, UnknownModel
from pacs_node.imaging.postprocess import SegmentCleanup
from pacs_node.imaging.preprocess import orientation_matrix
from pacs_node.inference.anatomy import AnatomyRules
from pacs_node.inference.labelmap import Algorithm, ModelInfo, SegmentSpec
from pacs_node.inference.queues import DEFAULT_QUEUE, valid_queue
from pacs_node.inference.vocabulary import (
    ANATOMICAL_STRUCTURE,
    BY_NAME,
    LEFT,
    RIGHT,
    CodedConcept,
    Structure,
)
from pacs_node.quality.limits import QUALITY_KEY, QualityLimits, limit_labels

METADATA = Path("configs/metadata.json")
INFERENCE = Path("configs/inference.json")
STATE_DICT = Path("models/model.pt")
TORCHSCRIPT = Path("models/model.ts")
MODEL_CARD = Path("docs/README.md")
NODE_KEY = "pacs_node"
CHANNEL_DEF = "network_data_format.outputs.pred.channel_def"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Zoo spellings -> vocabulary names, after normalisation (lower case, "_" for spaces/hyphens).
ALIASES: dict[str, str] = {
    "left_lung": "lung_left",
    "right_lung": "lung_right",
    "lungs": "lung",
    "left_kidney": "kidney_left",
    "right_kidney": "kidney_right",
    "kidney_l": "kidney_left",
    "kidney_r": "kidney_right",
    "lung_l": "lung_left",
    "lung_r": "lung_right",
    "vertebrae": "spine",
    "spinal_column": "spine",
    "vertebral_column": "spine",
    "rib": "ribs",
    "bones": "bone",
    "skeleton": "bone",
    "entire_body": "body",
    "intestine": "bowel",
}


class BundleKind(StrEnum):
    NETWORK = "network"
    CLASSICAL = "classical"


@dataclass(frozen=True, slots=True)
class Intensity:
    """The node-side intensity recipe (MONAI ScaleIntensityRange, a display window, z-score)."""

    kind: Literal["range", "window", "zscore", "percentile"]
    a_min: float = 0.0
    a_max: float = 1.0
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True
    center: float = 0.0
    width: float = 1.0
    nonzero: bool = False
    lower: float = 1.0  # percentile: the image's own percentiles mapped onto [0, 1]
    upper: float = 99.0


@dataclass(frozen=True, slots=True)
class NodePreprocessing:
    """Grid and intensities declared in ``pacs_node.preprocessing`` (used instead of the
    bundle's MONAI preprocessing). Spacing is (z, y, x) mm like :class:`Volume`; None keeps the
    source grid's."""

    spacing_zyx_mm: tuple[float, float, float] | None = None
    orientation: str | None = None
    intensity: Intensity | None = None
    # a 2D image without a usable pixel spacing spans this many mm along its longer side, for
    # resampling only; its sizes stay "not measurable"
    unknown_spacing_field_mm: float | None = None


@dataclass(frozen=True)
class Bundle:
    """One validated bundle: what the runner needs to run it and results need to describe it."""

    name: str
    root: Path
    version: str
    description: str
    kind: BundleKind
    modalities: tuple[str, ...]
    segments: tuple[SegmentSpec, ...]
    channels: int  # output channels including background
    min_slices: int
    weights: Path | None = None
    torchscript: bool = False
    preprocessing: NodePreprocessing | None = None
    patch_size: tuple[int, ...] | None = None
    overlap: float = 0.25
    sw_batch_size: int = 1
    cleanup: Mapping[int, SegmentCleanup] = field(default_factory=dict)
    anatomy: AnatomyRules | None = None
    algorithm: str | None = None  # classical algorithm name
    metadata: Mapping[str, Any] = field(default_factory=dict)
    sha256: str = ""  # over every file of the bundle: see bundle_sha256
    quality: QualityLimits = field(default_factory=QualityLimits)  # the gate's default limits
    queue: str = DEFAULT_QUEUE  # the device class whose workers run it

    @property
    def inference_config(self) -> Path:
        return self.root / INFERENCE

    @property
    def model_card(self) -> Path | None:
        card = self.root / MODEL_CARD
        return card if card.is_file() else None

    @property
    def info(self) -> ModelInfo:
        family = "Artificial Intelligence" if self.kind is BundleKind.NETWORK else "Heuristic"
        return ModelInfo(
            algorithm=Algorithm(
                name=self.name,
                version=self.version,
                family=family,
                description=self.description,
            ),
            modalities=self.modalities,
            segments=self.segments,
        )

    def as_json(self) -> dict[str, Any]:
        """The ``pacs-node models --json`` entry."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "path": str(self.root),
            "kind": str(self.kind),
            "modalities": list(self.modalities),
            "labels": [_segment_json(s) for s in self.segments],
        }


def _concept_json(concept: CodedConcept | None) -> dict[str, str] | None:
    if concept is None:
        return None
    return {"value": concept.value, "scheme": concept.scheme, "meaning": concept.meaning}


def _segment_json(spec: SegmentSpec) -> dict[str, Any]:
    s = spec.structure
    kind = _concept_json(s.type) or {}
    return {
        "value": spec.value,
        "name": s.name,
        "category": _concept_json(s.category),
        "type": {**kind, "modifier": _concept_json(s.modifier)},
        "color": list(s.color),
    }


# --------------------------------------------------------------------------- reading


class _Reader:
    """Typed access to a JSON document that raises BundleError with the file and dotted key."""

    def __init__(self, path: Path, data: Any) -> None:
        self.path = path
        self.data = data

    def fail(self, key: str, reason: str) -> BundleError:
        return BundleError(str(self.path), key, reason)

    def get(self, key: str, *, required: bool = False) -> Any:
        node = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if required:
                    raise self.fail(key, "is missing")
                return None
            node = node[part]
        return node

    def mapping(self, key: str, *, required: bool = False) -> dict[str, Any] | None:
        value = self.get(key, required=required)
        if value is not None and not isinstance(value, dict):
            raise self.fail(key, f"must be an object, got {type(value).__name__}")
        return value

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.get(key, required=required)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise self.fail(key, "must be a non-empty string")
        return value

    def number(self, key: str, low: float | None = None, high: float | None = None) -> float | None:
        value = self.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(key, f"must lie in [{low}, {high}], got {value}")
        return float(value)

    def integers(self, key: str, count: int | None = None) -> tuple[int, ...] | None:
        value = self.get(key)
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)
            or (count is not None and len(value) != count)
        ):
            size = f"{count} " if count else ""
            raise self.fail(key, f"must be a list of {size}positive integers, got {value!r}")
        return tuple(value)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(str(path), "(file)", f"cannot be read: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(
            str(path), f"line {exc.lineno} column {exc.colno}", f"not valid JSON: {exc.msg}"
        ) from exc


def normalise_label(name: str) -> str:
    """``"Left Kidney"`` -> ``"left_kidney"``; then the alias table."""
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return ALIASES.get(key, key)


def _concept(reader: _Reader, key: str, value: Any) -> CodedConcept:
    if (
        isinstance(value, list)
        and len(value) in (2, 3)
        and all(isinstance(v, str) and v for v in value)
    ):
        scheme = value[2] if len(value) == 3 else "SCT"
        return CodedConcept(value[0], scheme, value[1])
    raise reader.fail(key, f'must be ["code", "meaning"] or ["code", "meaning", "scheme"], '
                      f"got {value!r}")  # fmt: skip


def _color(reader: _Reader, key: str, value: Any) -> tuple[int, int, int]:
    if (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        return (value[0], value[1], value[2])
    raise reader.fail(key, f"must be three integers 0..255, got {value!r}")


def _custom_structure(reader: _Reader, key: str, entry: dict[str, Any]) -> Structure:
    """A label entry in ``pacs_node.labels``: a vocabulary name, optionally with overrides, or a
    new structure with its own SNOMED CT type code."""
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise reader.fail(f"{key}.name", "must be a non-empty string")
    base = BY_NAME.get(normalise_label(name))
    if base is None and "type" not in entry:
        known = ", ".join(sorted(BY_NAME))
        raise reader.fail(
            key, f"{name!r} is not in the vocabulary ({known}); give its SNOMED CT 'type' code"
        )
    modifier_name = entry.get("laterality")
    modifier = {"left": LEFT, "right": RIGHT, None: None}.get(modifier_name, ANATOMICAL_STRUCTURE)
    if modifier is ANATOMICAL_STRUCTURE:
        raise reader.fail(f"{key}.laterality", f'must be "left" or "right", got {modifier_name!r}')
    structure = base or Structure(
        name=name,
        display=str(entry.get("display", name)),
        category=ANATOMICAL_STRUCTURE,
        type=_concept(reader, f"{key}.type", entry["type"]),
        modifier=modifier,
        color=(128, 128, 128),
        paired=modifier is not None,
    )
    if "type" in entry:
        structure = replace(structure, type=_concept(reader, f"{key}.type", entry["type"]))
    if "category" in entry:
        category = _concept(reader, f"{key}.category", entry["category"])
        structure = replace(structure, category=category)
    if "color" in entry:
        structure = replace(structure, color=_color(reader, f"{key}.color", entry["color"]))
    if modifier is not None:
        structure = replace(structure, modifier=modifier, paired=True)
    return structure


def _segments(reader: _Reader) -> tuple[tuple[SegmentSpec, ...], int]:
    channel_def = reader.mapping(CHANNEL_DEF, required=True) or {}
    overrides = reader.mapping(f"{NODE_KEY}.labels") or {}
    specs: list[SegmentSpec] = []
    values: list[int] = []
    for raw_value, raw_name in channel_def.items():
        key = f"{CHANNEL_DEF}.{raw_value}"
        if not str(raw_value).isdigit():
            raise reader.fail(key, "channel numbers must be non-negative integers")
        value = int(raw_value)
        values.append(value)
        if not isinstance(raw_name, str):
            raise reader.fail(key, f"must be a label name, got {raw_name!r}")
        override = overrides.get(str(raw_value))
        if normalise_label(raw_name) == "background" and override is None:
            if value != 0:
                raise reader.fail(key, "background must be channel 0")
            continue
        if value == 0:
            raise reader.fail(key, f"channel 0 must be background, got {raw_name!r}")
        if override is not None:
            okey = f"{NODE_KEY}.labels.{raw_value}"
            entry = {"name": override} if isinstance(override, str) else override
            if not isinstance(entry, dict):
                raise reader.fail(okey, "must be a vocabulary name or an object")
            structure = _custom_structure(reader, okey, entry)
        else:
            found = BY_NAME.get(normalise_label(raw_name))
            if found is None:
                known = ", ".join(sorted(BY_NAME))
                raise reader.fail(
                    key,
                    f"label {raw_name!r} is not in the vocabulary ({known}); map it in "
                    f"{NODE_KEY}.labels.{raw_value} to a vocabulary name or a coded structure",
                )
            structure = found
        specs.append(SegmentSpec(value, structure))
    for extra in overrides:
        if extra not in channel_def:
            raise reader.fail(f"{NODE_KEY}.labels.{extra}", f"no such channel in {CHANNEL_DEF}")
    if not specs:
        raise reader.fail(CHANNEL_DEF, "declares no label besides background")
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise reader.fail(CHANNEL_DEF, f"labels map to the same structure: {', '.join(repeated)}")
    if sorted(values) != list(range(len(values))):
        raise reader.fail(CHANNEL_DEF, f"channels must be 0..{len(values) - 1}, got {values}")
    return tuple(specs), len(values)


def _modalities(reader: _Reader) -> tuple[str, ...]:
    declared = reader.get(f"{NODE_KEY}.modalities")
    if declared is not None:
        if not isinstance(declared, list) or not all(
            isinstance(m, str) and m.strip() for m in declared
        ):
            raise reader.fail(f"{NODE_KEY}.modalities", "must be a list of modality codes")
        return tuple(m.strip().upper() for m in declared)
    zoo = reader.get("network_data_format.inputs.image.modality")
    if isinstance(zoo, str) and zoo.strip():
        return tuple(m.strip().upper() for m in re.split(r"[/,;]| and ", zoo) if m.strip())
    return ()  # any modality


def _intensity(reader: _Reader, key: str) -> Intensity | None:
    spec = reader.mapping(key)
    if spec is None:
        return None
    kind = spec.get("kind")
    if kind == "range":
        a_min = reader.number(f"{key}.a_min")
        a_max = reader.number(f"{key}.a_max")
        if a_min is None or a_max is None or a_min == a_max:
            raise reader.fail(key, "range needs a_min and a_max that differ")
        clip = spec.get("clip", True)
        if not isinstance(clip, bool):
            raise reader.fail(f"{key}.clip", "must be true or false")
        b_min = reader.number(f"{key}.b_min")
        b_max = reader.number(f"{key}.b_max")
        return Intensity(
            "range",
            a_min=a_min,
            a_max=a_max,
            b_min=0.0 if b_min is None else b_min,
            b_max=1.0 if b_max is None else b_max,
            clip=clip,
        )
    if kind == "window":
        center = reader.number(f"{key}.center")
        width = reader.number(f"{key}.width", low=1e-6)
        if center is None or width is None:
            raise reader.fail(key, "window needs center and width")
        return Intensity("window", center=center, width=width)
    if kind == "zscore":
        nonzero = spec.get("nonzero", False)
        if not isinstance(nonzero, bool):
            raise reader.fail(f"{key}.nonzero", "must be true or false")
        return Intensity("zscore", nonzero=nonzero)
    if kind == "percentile":
        lower = reader.number(f"{key}.lower", low=0.0, high=100.0)
        upper = reader.number(f"{key}.upper", low=0.0, high=100.0)
        lower, upper = 1.0 if lower is None else lower, 99.0 if upper is None else upper
        if lower >= upper:
            raise reader.fail(key, "percentile needs lower below upper")
        return Intensity("percentile", lower=lower, upper=upper)
    raise reader.fail(
        f"{key}.kind", f'must be "range", "window", "zscore" or "percentile", got {kind!r}'
    )


def _preprocessing(reader: _Reader) -> NodePreprocessing | None:
    key = f"{NODE_KEY}.preprocessing"
    spec = reader.mapping(key)
    if spec is None:
        return None
    spacing = reader.get(f"{key}.spacing_zyx_mm")
    if spacing is not None and (
        not isinstance(spacing, list)
        or len(spacing) != 3
        or any(isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 for v in spacing)
    ):
        raise reader.fail(f"{key}.spacing_zyx_mm", "must be three positive numbers (z, y, x mm)")
    orientation = reader.string(f"{key}.orientation")
    if orientation is not None:
        try:
            orientation_matrix(orientation)
        except ValueError as exc:
            raise reader.fail(f"{key}.orientation", str(exc)) from exc
    field = reader.number(f"{key}.unknown_spacing_field_mm", low=10.0, high=2000.0)
    return NodePreprocessing(
        spacing_zyx_mm=None if spacing is None else (spacing[0], spacing[1], spacing[2]),
        orientation=orientation,
        intensity=_intensity(reader, f"{key}.intensity"),
        unknown_spacing_field_mm=field,
    )


def _cleanup(reader: _Reader, values: set[int]) -> dict[int, SegmentCleanup]:
    key = f"{NODE_KEY}.cleanup"
    spec = reader.mapping(key) or {}
    result: dict[int, SegmentCleanup] = {}
    for raw, steps in spec.items():
        item = f"{key}.{raw}"
        if not str(raw).isdigit() or int(raw) not in values:
            raise reader.fail(item, "must name a label value of the bundle")
        if not isinstance(steps, dict):
            raise reader.fail(item, "must be an object")
        allowed = {"largest_component", "fill_holes", "min_volume_ml", "min_voxels", "smoothing_mm"}
        unknown = sorted(set(steps) - allowed)
        if unknown:
            raise reader.fail(f"{item}.{unknown[0]}", f"unknown step (known: {sorted(allowed)})")
        for flag in ("largest_component", "fill_holes"):
            if not isinstance(steps.get(flag, False), bool):
                raise reader.fail(f"{item}.{flag}", "must be true or false")
        min_voxels = reader.number(f"{item}.min_voxels", low=0)
        result[int(raw)] = SegmentCleanup(
            largest_component=bool(steps.get("largest_component", False)),
            fill_holes=bool(steps.get("fill_holes", False)),
            min_volume_ml=reader.number(f"{item}.min_volume_ml", low=0),
            min_voxels=None if min_voxels is None else int(min_voxels),
            smoothing_mm=reader.number(f"{item}.smoothing_mm", low=0),
        )
    return result


def _anatomy(reader: _Reader, segments: tuple[SegmentSpec, ...]) -> AnatomyRules | None:
    key = f"{NODE_KEY}.anatomy"
    spec = reader.mapping(key)
    if spec is None:
        return None
    allowed = {"body", "confine_to_body", "air_only", "air_hu_max", "exclude_table"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise reader.fail(f"{key}.{unknown[0]}", f"unknown rule (known: {sorted(allowed)})")
    by_name = {s.name: s.value for s in segments}
    body = reader.string(f"{key}.body", required=True) or ""
    if body not in by_name:
        raise reader.fail(f"{key}.body", f"{body!r} is not a label of the bundle")
    air_only = spec.get("air_only", [])
    if not isinstance(air_only, list) or any(n not in by_name or n == body for n in air_only):
        raise reader.fail(f"{key}.air_only", "must list label names of the bundle (not the body)")
    for flag in ("confine_to_body", "exclude_table"):
        if not isinstance(spec.get(flag, False), bool):
            raise reader.fail(f"{key}.{flag}", "must be true or false")
    air_hu_max = reader.number(f"{key}.air_hu_max", low=-1000.0, high=0.0)
    return AnatomyRules(
        body=by_name[body],
        confine_to_body=bool(spec.get("confine_to_body", False)),
        air_only=tuple(by_name[n] for n in air_only),
        air_hu_max=-400.0 if air_hu_max is None else air_hu_max,
        exclude_table=bool(spec.get("exclude_table", False)),
    )


def _quality(reader: _Reader, segments: tuple[SegmentSpec, ...]) -> QualityLimits:
    """The quality gate's limits (``pacs_node.quality``), refused at load when a value is
    wrong or a label is not one of the bundle's."""
    key = f"{NODE_KEY}.{QUALITY_KEY}"
    raw = reader.mapping(key) or {}
    try:
        limits = QualityLimits.model_validate(raw)
    except ValidationError as exc:
        raise reader.fail(key, _pydantic_reason(exc)) from exc
    unknown = sorted(limit_labels(limits) - {s.name for s in segments})
    if unknown:
        raise reader.fail(key, f"names labels the bundle does not have: {', '.join(unknown)}")
    return limits


def _pydantic_reason(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(value)'}: {e['msg']}" for e in exc.errors()
    )


def _inferer(inference: Path) -> dict[str, Any]:
    """Plain values of the SlidingWindowInferer in inference.json (roi_size, overlap,
    sw_batch_size); expressions (``$...``, ``@...``) are left to the defaults."""
    if not inference.is_file():
        return {}
    inferer = _Reader(inference, _read_json(inference)).mapping("inferer") or {}
    found: dict[str, Any] = {}
    roi = inferer.get("roi_size")
    if isinstance(roi, list) and roi and all(isinstance(v, int) and v > 0 for v in roi):
        found["roi_size"] = tuple(roi)
    overlap = inferer.get("overlap")
    if isinstance(overlap, int | float) and 0 <= overlap < 1:
        found["overlap"] = float(overlap)
    batch = inferer.get("sw_batch_size")
    if isinstance(batch, int) and batch > 0:
        found["sw_batch_size"] = batch
    return found


ALLOWLIST_KEY = "model_sha256_allowlist"
_SKIPPED_DIRS = frozenset({"__pycache__"})  # Python writes these itself; bundles are not imported
_CHUNK = 1 << 20


def _bundle_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(path relative to the bundle, path) of every file, sorted by the relative path; links
    are followed (what they point to is what runs), each real folder walked once."""
    seen: set[str] = set()
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        for name in files:
            path = Path(folder) / name
            if path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    yield from sorted(found)


def bundle_sha256(root: Path) -> str:
    """SHA-256 of a bundle: for each file in path order, its relative path, its size and its
    bytes. Any change to what the bundle runs (weights, a ``$`` expression in a config, a
    TorchScript file, a file added or renamed) changes it."""
    digest = hashlib.sha256()
    for relpath, path in _bundle_files(root):
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            digest.update(f"{relpath}\0{size}\0".encode())
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def load_bundle(root: Path) -> Bundle:
    """Read and validate one bundle folder; raise :class:`BundleError` with file and key."""
    path = root / METADATA
    if not path.is_file():
        raise BundleError(str(path), "(file)", "missing: a bundle needs configs/metadata.json")
    name = root.name
    if not _NAME.match(name):
        raise BundleError(str(root), "(folder)", f"bundle name {name!r} is not a safe name")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise BundleError(str(path), "(top level)", "must be a JSON object")
    reader = _Reader(path, data)
    version = reader.string("version", required=True) or ""
    reader.mapping(NODE_KEY)
    kind_value = reader.get(f"{NODE_KEY}.kind") or BundleKind.NETWORK.value
    try:
        kind = BundleKind(kind_value)
    except ValueError as exc:
        raise reader.fail(f"{NODE_KEY}.kind", f'must be "network" or "classical", '
                          f"got {kind_value!r}") from exc  # fmt: skip
    segments, channels = _segments(reader)
    description = str(data.get("description") or data.get("task") or "")
    spatial = reader.get("network_data_format.inputs.image.spatial_shape")
    patch = reader.integers(f"{NODE_KEY}.patch_size")
    weights: Path | None = None
    torchscript = False
    algorithm: str | None = None
    inferer: dict[str, Any] = {}
    if kind is BundleKind.CLASSICAL:
        algorithm = reader.string(f"{NODE_KEY}.algorithm", required=True) or ""
        from pacs_node.inference.classical import ALGORITHMS

        if algorithm not in ALGORITHMS:
            raise reader.fail(
                f"{NODE_KEY}.algorithm",
                f"unknown classical algorithm (known: {sorted(ALGORITHMS)})",
            )
        offered = set(ALGORITHMS[algorithm][1].values())
        for spec in segments:
            if spec.name not in offered:
                raise reader.fail(
                    f"{CHANNEL_DEF}.{spec.value}",
                    f"{algorithm} does not produce {spec.name!r} (it gives {sorted(offered)})",
                )
    else:
        if (root / STATE_DICT).is_file():
            weights = root / STATE_DICT
            config = root / INFERENCE
            if not config.is_file():
                raise BundleError(str(config), "(file)", "missing: model.pt needs network_def")
            inference = _Reader(config, _read_json(config))
            if inference.get("network_def") is None:
                raise inference.fail("network_def", "is missing: model.pt needs the network")
        elif (root / TORCHSCRIPT).is_file():
            weights, torchscript = root / TORCHSCRIPT, True
        else:
            raise BundleError(
                str(root / "models"), "(file)", "no weights: need models/model.pt or model.ts"
            )
        inferer = _inferer(root / INFERENCE)
        patch = patch or inferer.get("roi_size")
        if patch is None and isinstance(spatial, list) and all(isinstance(v, int) for v in spatial):
            patch = tuple(spatial)
    dims = len(patch) if patch else 3
    default_min = 8 if kind is BundleKind.NETWORK and dims == 3 else 1
    min_slices = reader.number(f"{NODE_KEY}.min_slices", low=1)
    overlap = reader.number(f"{NODE_KEY}.overlap", low=0.0, high=0.95)
    sw_batch = reader.number(f"{NODE_KEY}.sw_batch_size", low=1)
    queue = reader.string(f"{NODE_KEY}.queue") or DEFAULT_QUEUE
    if not valid_queue(queue):
        raise reader.fail(f"{NODE_KEY}.queue", "must be a short lower-case name such as cpu or gpu")
    return Bundle(
        name=name,
        root=root,
        version=version,
        description=description,
        kind=kind,
        modalities=_modalities(reader),
        segments=segments,
        channels=channels,
        min_slices=default_min if min_slices is None else int(min_slices),
        weights=weights,
        torchscript=torchscript,
        preprocessing=_preprocessing(reader),
        patch_size=patch,
        overlap=inferer.get("overlap", 0.25) if overlap is None else overlap,
        sw_batch_size=inferer.get("sw_batch_size", 1) if sw_batch is None else int(sw_batch),
        cleanup=_cleanup(reader, {s.value for s in segments}),
        anatomy=_anatomy(reader, segments),
        algorithm=algorithm,
        metadata=data,
        sha256=bundle_sha256(root),
        quality=_quality(reader, segments),
        queue=queue,
    )


def declared_queue(models_dir: Path, name: str) -> str:
    """The device class a bundle names (``pacs_node.queue`` in its metadata), read without
    loading or hashing the bundle: for reports on many jobs. ``cpu`` when the bundle is gone
    or names none, or none that is valid (its load would refuse it)."""
    if not _NAME.match(name):
        return DEFAULT_QUEUE
    try:
        data = json.loads((models_dir / name / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DEFAULT_QUEUE
    section = data.get(NODE_KEY) if isinstance(data, dict) else None
    queue = section.get("queue") if isinstance(section, dict) else None
    return queue if isinstance(queue, str) and valid_queue(queue) else DEFAULT_QUEUE


class Registry:
    """The bundles of one models folder; each is read once and kept. With an ``allowlist`` of
    SHA-256 digests, a bundle whose digest is not listed is refused when it is loaded."""

    def __init__(self, models_dir: Path, allowlist: Collection[str] = ()) -> None:
        self.models_dir = models_dir
        self.allowlist = frozenset(allowlist)
        self._loaded: dict[str, Bundle] = {}

    def names(self) -> list[str]:
        """Folder names that hold a bundle (``configs/metadata.json``), sorted."""
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if (p / METADATA).is_file())

    def get(self, name: str) -> Bundle:
        if name in self._loaded:
            return self._loaded[name]
        if not _NAME.match(name) or not (self.models_dir / name / METADATA).is_file():
            known = ", ".join(self.names()) or "none"
            raise UnknownModel(f"no model {name!r} in {self.models_dir} (available: {known})")
        bundle = load_bundle(self.models_dir / name)
        if self.allowlist and bundle.sha256 not in self.allowlist:
            raise BundleError(
                str(bundle.root), ALLOWLIST_KEY, f"SHA-256 {bundle.sha256} is not in the allowlist"
            )
        self._loaded[name] = bundle
        return bundle

    def load_all(self) -> list[Bundle]:
        """Every bundle, validated: the first broken one raises, so the node refuses to start."""
        return [self.get(name) for name in self.names()]
