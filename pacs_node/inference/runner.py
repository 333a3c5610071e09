"""Run a bundle on a Volume and return a Labelmap on the Volume's own grid.

Geometry is the part that must not go wrong, so it goes through one route for every bundle:

- Our DICOM loading (:class:`Volume`, LPS, array order z, y, x) sits in front of the bundle's
  own preprocessing. The Volume is handed to the bundle's MONAI transforms as the
  ``MetaTensor`` its ``LoadImaged`` would have produced from a NIfTI file: channel first,
  array order (x, y, z) and a RAS affine, so ``Orientationd(axcodes="RAS")``, ``Spacingd`` and
  intensity transforms behave exactly as they were trained. ``LoadImage(d)`` is the only
  transform left out.
- Whatever grid the transforms produce, its affine comes back with the tensor; turned into a
  :class:`Grid` (LPS, z, y, x) it is the grid the network's output lives on. Probabilities are
  mapped back to the source grid slab by slab (:func:`probabilities_to_source`), instead of the
  bundle's ``Invertd``/``SaveImaged``, so a many-label model on a long CT stays in memory.
- A bundle may instead declare the node-side recipe (``pacs_node.preprocessing``: spacing,
  orientation code, intensity); it is run with :mod:`pacs_node.imaging.preprocess` and fed to the
  network in the same (x, y, z) order.

A bundle is loaded once per process (a cache keyed by folder, weights mtime and device) and
reused by every later call. Inference is MONAI sliding-window on CPU by default, on CUDA when
present (AMP optional there).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from pacs_node.cpus import inference_threads, limit_threads
from pacs_node.errors import BundleError, ModelError, UnsuitableInput
from pacs_node.imaging import preprocess
from pacs_node.imaging.postprocess import clean_segments, probabilities_to_source
from pacs_node.imaging.volume import Grid, Volume, VolumeKind
from pacs_node.inference.anatomy import Removal, apply_anatomy, describe
from pacs_node.inference.classical import ALGORITHMS
from pacs_node.inference.labelmap import Labelmap, ModelInfo
from pacs_node.inference.registry import Bundle, BundleKind, Intensity, Registry

log = logging.getLogger(__name__)

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# (z, y, x, 1) <-> (x, y, z, 1): the permutation is its own inverse
_SWAP = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)

Progress = Callable[[str], None]


@dataclass
class Timings:
    """Seconds spent per stage; ``decode`` (DICOM to Volume) is filled by the caller."""

    decode: float = 0.0
    load: float = 0.0
    preprocess: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0

    @property
    def total(self) -> float:
        return self.decode + self.load + self.preprocess + self.infer + self.postprocess

    def as_json(self) -> dict[str, float]:
        return {
            "decode_s": round(self.decode, 4),
            "load_s": round(self.load, 4),
            "preprocess_s": round(self.preprocess, 4),
            "infer_s": round(self.infer, 4),
            "postprocess_s": round(self.postprocess, 4),
            "total_s": round(self.total, 4),
        }


@dataclass(frozen=True)
class Segmentation:
    """What one run gives: the labels on the source grid, the model and where time went."""

    labelmap: Labelmap
    model: ModelInfo
    timings: Timings
    device: str
    removals: tuple[Removal, ...] = ()  # what the bundle's anatomical rules took away

    @property
    def notes(self) -> list[str]:
        """The removals in words, per label and rule."""
        names = {s.value: s.name for s in self.labelmap.segments}
        return describe(self.removals, names)


@dataclass
class LoadedModel:
    """A bundle ready to run: the network in eval mode on its device and its transforms."""

    bundle: Bundle
    device: torch.device
    network: torch.nn.Module | None = None
    transforms: list[Any] = field(default_factory=list)
    image_key: str = "image"
    uses_monai_preprocessing: bool = False


_CACHE: dict[tuple[str, float, str], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {requested!r} requested but CUDA is not available")
    return torch.device(requested)


def volume_grid_from_ras_xyz(
    affine_ras_xyz: NDArray[np.float64], shape_xyz: tuple[int, ...]
) -> Grid:
    """A Grid (LPS, array order z, y, x) from a MONAI affine (RAS, array order x, y, z)."""
    affine = _LPS_RAS @ np.asarray(affine_ras_xyz, dtype=np.float64) @ _SWAP
    affine.setflags(write=False)
    return Grid((int(shape_xyz[2]), int(shape_xyz[1]), int(shape_xyz[0])), affine)


def ras_xyz_affine(grid: Grid) -> NDArray[np.float64]:
    """The MONAI/NIfTI affine (array order x, y, z, RAS) of a Grid."""
    result: NDArray[np.float64] = _LPS_RAS @ grid.affine @ _SWAP
    return result


def _load_network(bundle: Bundle, device: torch.device) -> tuple[torch.nn.Module, list[Any], str]:
    """The network (state dict into network_def, or TorchScript) and the preprocessing transforms
    from inference.json, without its LoadImage step."""
    from monai.bundle.config_parser import ConfigParser

    transforms: list[Any] = []
    key = "image"
    parser: Any = None
    config = bundle.inference_config
    if config.is_file():
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(bundle.root)
    assert bundle.weights is not None  # registry guarantees weights for a network bundle
    try:
        if bundle.torchscript:
            network: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(bundle.weights), map_location=device
            )
        else:
            network = parser.get_parsed_content("network_def", instantiate=True)
            state = torch.load(str(bundle.weights), map_location=device, weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]  # CheckpointLoader's {"model": state_dict} layout
            network.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, OSError) as exc:
        raise BundleError(str(bundle.weights), "(weights)", f"cannot be loaded: {exc}") from exc
    if parser is not None and bundle.preprocessing is None and "preprocessing" in parser.config:
        try:
            compose = parser.get_parsed_content("preprocessing", instantiate=True)
        except Exception as exc:  # ConfigParser raises bare Exceptions from user expressions
            raise BundleError(str(config), "preprocessing", f"cannot be built: {exc}") from exc
        for transform in getattr(compose, "transforms", [compose]):
            if type(transform).__name__ in ("LoadImaged", "LoadImage"):
                keys = getattr(transform, "keys", None)
                if keys:
                    key = str(keys[0])
                continue
            transforms.append(transform)
    network.to(device)
    network.eval()
    return network, transforms, key


def load_model(bundle: Bundle, device: torch.device) -> LoadedModel:
    """The bundle ready to run, from the process cache when it was loaded before."""
    stamp = bundle.weights.stat().st_mtime if bundle.weights is not None else 0.0
    cache_key = (str(bundle.root.resolve()), stamp, str(device))
    with _CACHE_LOCK:
        cached = _CACHE.get(cache_key)
        if cached is not None:
            return cached
        if bundle.kind is BundleKind.CLASSICAL:
            loaded = LoadedModel(bundle, device)
        else:
            network, transforms, key = _load_network(bundle, device)
            loaded = LoadedModel(
                bundle,
                device,
                network=network,
                transforms=transforms,
                image_key=key,
                uses_monai_preprocessing=bool(transforms),
            )
        _CACHE[cache_key] = loaded
        log.info("model loaded", extra={"model": bundle.name, "device": str(device)})
        return loaded


def check_input(bundle: Bundle, volume: Volume) -> None:
    """Refuse, with the reason, a series the model cannot take."""
    if bundle.modalities and volume.modality.upper() not in bundle.modalities:
        raise UnsuitableInput(
            f"model {bundle.name} takes {', '.join(bundle.modalities)}; "
            f"this series is {volume.modality or 'of unknown modality'}"
        )
    if volume.shape[0] < bundle.min_slices:
        raise UnsuitableInput(
            f"model {bundle.name} needs at least {bundle.min_slices} slices; "
            f"this series has {volume.shape[0]}"
        )
    if bundle.min_slices > 1 and volume.kind is not VolumeKind.SERIES:
        raise UnsuitableInput(f"model {bundle.name} is 3D; this series is a {volume.kind} image")


def _intensity(voxels: NDArray[np.float32], recipe: Intensity | None) -> NDArray[np.float32]:
    if recipe is None:
        return voxels
    if recipe.kind == "range":
        return preprocess.scale_intensity_range(
            voxels, recipe.a_min, recipe.a_max, recipe.b_min, recipe.b_max, clip=recipe.clip
        )
    if recipe.kind == "window":
        return preprocess.window(voxels, recipe.center, recipe.width)
    if recipe.kind == "percentile":
        return preprocess.percentile_scale(voxels, recipe.lower, recipe.upper)
    return preprocess.zscore(voxels, nonzero=recipe.nonzero)


def _monai_input(volume: Volume, loaded: LoadedModel) -> tuple[torch.Tensor, Grid]:
    """The Volume through the bundle's own transforms, as LoadImaged would have handed it over."""
    from monai.data.meta_tensor import MetaTensor

    affine = ras_xyz_affine(volume.grid)
    array = np.ascontiguousarray(np.asarray(volume.voxels, dtype=np.float32).transpose(2, 1, 0))
    meta = {
        "affine": torch.as_tensor(affine, dtype=torch.float64),
        "original_affine": affine.copy(),
        "original_channel_dim": 0,
        "spatial_shape": np.array(array.shape),
        "space": "RAS",
        "filename_or_obj": volume.series_instance_uid or "volume",
    }
    image = MetaTensor(torch.from_numpy(array)[None], meta=meta)
    data: Any = {loaded.image_key: image}
    for transform in loaded.transforms:
        data = transform(data)
    result = data[loaded.image_key]
    if not isinstance(result, MetaTensor) or result.ndim != 4:
        raise BundleError(
            str(loaded.bundle.inference_config),
            "preprocessing",
            "must leave a channel-first 3D image with its affine (MetaTensor)",
        )
    grid = volume_grid_from_ras_xyz(result.affine.numpy(), tuple(result.shape[1:]))
    return result.as_tensor().float(), grid


def assumed_spacing(volume: Volume, bundle: Bundle) -> Volume:
    """The Volume the model runs on. A 2D image without a usable pixel spacing (Pixel Spacing
    0, none given) would be resampled as 1 mm pixels and reach the network many times too
    small; a bundle that declares ``unknown_spacing_field_mm`` (a chest detector's 430 mm)
    has it taken to span that along its longer side instead. Labels come back on the same
    pixels; the Volume the results measure keeps ``spacing_known`` False, so no size is ever
    reported from the assumption."""
    recipe = bundle.preprocessing
    field = recipe.unknown_spacing_field_mm if recipe else None
    if field is None or volume.spacing_known or volume.kind is not VolumeKind.IMAGE:
        return volume
    pixel = field / max(volume.shape[1], volume.shape[2])
    return replace(volume, spacing=(volume.spacing[0], pixel, pixel))


def _node_input(volume: Volume, bundle: Bundle) -> tuple[torch.Tensor, Grid]:
    """The node-side recipe: resample to the declared grid, scale intensities, (x, y, z) order."""
    recipe = bundle.preprocessing
    spacing = recipe.spacing_zyx_mm if recipe else None
    orientation = recipe.orientation if recipe else None
    if spacing is None and orientation is None:
        voxels = np.asarray(volume.voxels, dtype=np.float32)
        grid = volume.grid
    else:
        voxels, grid = preprocess.resample_volume(volume, spacing, orientation)
    voxels = _intensity(voxels, recipe.intensity if recipe else None)
    tensor = torch.from_numpy(np.ascontiguousarray(voxels.transpose(2, 1, 0)))[None]
    return tensor, grid


def _infer(loaded: LoadedModel, image: torch.Tensor, amp: bool) -> NDArray[np.float32]:
    """Sliding-window inference; returns probabilities [C, z, y, x] (our array order)."""
    from monai.inferers.utils import sliding_window_inference

    bundle = loaded.bundle
    assert loaded.network is not None
    spatial = tuple(int(n) for n in image.shape[1:])
    roi = bundle.patch_size or spatial
    if len(roi) != len(spatial):
        raise BundleError(
            str(bundle.root), "patch_size", f"has {len(roi)} dimensions, the input {len(spatial)}"
        )
    batch = image[None].to(loaded.device)
    use_amp = amp and loaded.device.type == "cuda"
    with torch.inference_mode(), torch.autocast(loaded.device.type, enabled=use_amp):
        logits = sliding_window_inference(
            batch,
            roi_size=roi,
            sw_batch_size=bundle.sw_batch_size,
            predictor=loaded.network,
            overlap=bundle.overlap,
            mode="gaussian",
        )
        if isinstance(logits, tuple | list | dict):
            raise BundleError(str(bundle.root), "network", "must return one tensor")
        logits = logits.float()
        if logits.shape[1] == 1:  # one sigmoid channel: background is its complement
            p = torch.sigmoid(logits)
            probs = torch.cat([1 - p, p], dim=1)
        else:
            probs = torch.softmax(logits, dim=1)
    if probs.shape[1] != bundle.channels:
        raise BundleError(
            str(bundle.root / "configs/metadata.json"),
            "network_data_format.outputs.pred.channel_def",
            f"declares {bundle.channels} channels, the network gives {probs.shape[1]}",
        )
    result = probs[0].permute(0, 3, 2, 1).contiguous().cpu().numpy()
    return np.asarray(result, dtype=np.float32)


class Runner:
    """Runs bundles of one registry on Volumes; models stay loaded for the process."""

    def __init__(
        self, registry: Registry, *, device: str = "auto", threads: int = 0, amp: bool = False
    ) -> None:
        self.registry = registry
        self.device = pick_device(device)
        self.amp = amp
        # 0: all usable cores, for a process that runs alone (the CLI); job workers pass
        # their share (pacs_node.worker.make_runner)
        self.threads = inference_threads(threads, 1)
        limit_threads(self.threads)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if torch.get_num_interop_threads() != self.threads:
            # between operators, rarely used in eager inference: not one idle thread per core
            with contextlib.suppress(RuntimeError):  # settable only before its first use
                torch.set_num_interop_threads(self.threads)

    @staticmethod
    def pools() -> dict[str, int]:
        """The sizes of torch's thread pools in this process, as it runs them."""
        return {
            "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
        }

    def segment(self, model: str, volume: Volume, progress: Progress | None = None) -> Segmentation:
        """Labels of ``model`` on ``volume``'s grid, or :class:`UnsuitableInput` saying why not."""
        step = progress or (lambda _stage: None)
        timings = Timings()
        bundle = self.registry.get(model)
        check_input(bundle, volume)
        step("load")
        started = time.perf_counter()
        loaded = load_model(bundle, self.device)
        timings.load = time.perf_counter() - started
        model_volume = assumed_spacing(volume, bundle)
        if bundle.kind is BundleKind.CLASSICAL:
            labels = self._classical(bundle, model_volume, timings, step)
        else:
            labels = self._network(loaded, model_volume, timings, step)
        started = time.perf_counter()
        removals: list[Removal] = []
        if bundle.anatomy is not None:
            hu = volume.voxels if volume.modality.upper() == "CT" else None
            labels, removals = apply_anatomy(labels, bundle.anatomy, model_volume.spacing, hu)
        if bundle.cleanup:
            labels = clean_segments(labels, model_volume.spacing, bundle.cleanup)
        timings.postprocess += time.perf_counter() - started
        labelmap = Labelmap(labels=labels, segments=bundle.segments)
        return Segmentation(labelmap, bundle.info, timings, str(self.device), tuple(removals))

    def _network(
        self, loaded: LoadedModel, volume: Volume, timings: Timings, step: Progress
    ) -> NDArray[np.integer]:
        step("preprocess")
        started = time.perf_counter()
        if loaded.uses_monai_preprocessing:
            image, grid = _monai_input(volume, loaded)
        else:
            image, grid = _node_input(volume, loaded.bundle)
        timings.preprocess = time.perf_counter() - started
        step("infer")
        started = time.perf_counter()
        probabilities = _infer(loaded, image, self.amp)
        timings.infer = time.perf_counter() - started
        step("postprocess")
        started = time.perf_counter()
        labels = probabilities_to_source(probabilities, grid, volume.grid)
        timings.postprocess = time.perf_counter() - started
        return labels

    def _classical(
        self, bundle: Bundle, volume: Volume, timings: Timings, step: Progress
    ) -> NDArray[np.integer]:
        assert bundle.algorithm is not None
        algorithm, names = ALGORITHMS[bundle.algorithm]
        step("infer")
        started = time.perf_counter()
        raw = algorithm(volume.voxels, volume.spacing, volume.direction)
        timings.infer = time.perf_counter() - started
        step("postprocess")
        started = time.perf_counter()
        # the algorithm's own values -> the bundle's channel values, matched by name
        by_name = {spec.name: spec.value for spec in bundle.segments}
        lookup = np.zeros(max(names) + 1, dtype=np.uint8)
        for value, name in names.items():
            lookup[value] = by_name.get(name, 0)
        labels = lookup[raw]
        timings.postprocess = time.perf_counter() - started
        return labels
