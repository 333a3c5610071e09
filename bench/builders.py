"""Results builders benchmark: seconds of each result builder on one realistic case, without
the network or the catalog.

The case: a procedural phantom torso CT (``models/phantom``, seed 17, 2.5 mm slices of 0.9 mm
pixels over 300 mm: about 120 slices of 512 x 512) written as DICOM and read back as the node
reads it, with the phantom's own organ labels as the ``ct-torso-organs`` segmentation (so no
inference runs: the labels are the organs the model is trained to find, on the same grid).
Each builder runs ``--repeat`` times (median reported) on the same inputs, in the order the
worker runs them: measurements (+ quality gate), SEG, SR, presentation state (GSPS), key
images, PDF (its pictures and the PDF itself, then the encapsulated PDF), FHIR Bundle.

    .venv/bin/python bench/builders.py [--repeat 3] [--slices-mm 300] [--models-dir models]

Prints a markdown table and writes bench/results/builders.json. The machine is shared; numbers
are noisy, compare runs of one invocation.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))
RESULTS = ROOT / "bench" / "results" / "builders.json"
MODEL = "ct-torso-organs"


def case_inputs(models_dir: Path, coverage_mm: float, folder: Path) -> tuple[Any, Any, Any]:
    """(Volume, Labelmap, ModelInfo): the phantom CT as the node decodes it, and its labels."""
    from phantom.render import TRAINING, render_ct
    from phantom.writers import write_dicom

    from pacs_node.imaging.volume import load_series
    from pacs_node.inference.labelmap import Labelmap
    from pacs_node.inference.registry import Registry

    ranges = replace(
        TRAINING,
        thickness_mm=(2.5, 2.5),
        pixel_mm=(0.9, 0.9),
        coverage_mm=(coverage_mm, coverage_mm),
        fov_scale=(1.1, 1.1),
        noise=(10.0, 10.0),
        metal=False,
    )
    case = render_ct(17, ranges)
    volume = load_series(write_dicom(case, folder))
    bundle = Registry(models_dir).get(MODEL)
    by_name = {s.structure.name: s.value for s in bundle.segments}
    labels = np.zeros(case.labels.shape, dtype=np.uint8)
    for value, name in case.label_names.items():
        if name in by_name:
            labels[case.labels == value] = by_name[name]
    if labels.shape != volume.voxels.shape:
        raise RuntimeError(f"labels {labels.shape} on a volume of {volume.voxels.shape}")
    return volume, Labelmap(labels=labels, segments=bundle.segments), bundle.info


def measure(repeat: int, models_dir: Path, coverage_mm: float) -> dict[str, Any]:
    from pacs_node.inference.registry import Registry
    from pacs_node.outputs import OutputKind
    from pacs_node.quality import merge_limits
    from pacs_node.quality.checks import run_checks
    from pacs_node.results import ResultOptions
    from pacs_node.results.build import stored
    from pacs_node.results.fhir import build_bundle, bundle_json
    from pacs_node.results.measurements import measure_labelmap
    from pacs_node.results.overlay import (
        build_key_images,
        build_presentation_state,
        key_slices,
        render_slice,
    )
    from pacs_node.results.pdf import build_pdf, encapsulate_pdf
    from pacs_node.results.provenance import Provenance
    from pacs_node.results.seg import build_segmentation, segment_numbering
    from pacs_node.results.sr import build_measurement_report

    with tempfile.TemporaryDirectory() as folder:
        volume, labelmap, info = case_inputs(models_dir, coverage_mm, Path(folder))
    limits = merge_limits(Registry(models_dir).get(MODEL).quality, None)
    options = ResultOptions(quality=limits)
    provenance = Provenance.of(volume, labelmap, info, options)
    numbering = segment_numbering(labelmap)
    seconds: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    detail: dict[str, Any] = {}

    def timed(name: str, build: Callable[[], Any]) -> Any:
        result = None
        for _ in range(repeat):
            started = time.perf_counter()
            result = build()
            seconds.setdefault(name, []).append(time.perf_counter() - started)
        return result

    def measured() -> Any:
        findings = measure_labelmap(volume, labelmap)
        run_checks(volume, findings, limits, labelmap)
        return findings

    findings = timed("measurements", measured)
    seg = timed(
        "seg", lambda: build_segmentation(volume, labelmap, provenance, numbering=numbering)
    )
    sizes["seg"] = len(stored(OutputKind.SEG, seg).data)
    sr = timed(
        "sr", lambda: build_measurement_report(findings, seg, numbering, provenance, flagged=None)
    )
    sizes["sr"] = len(stored(OutputKind.SR, sr).data)
    gsps = timed(
        "gsps",
        lambda: build_presentation_state(
            volume, labelmap, findings, numbering.by_value, provenance
        ),
    )
    sizes["gsps"] = len(stored(OutputKind.GSPS, gsps).data)
    annotations = gsps.get("GraphicAnnotationSequence", [])
    detail["gsps_annotations"] = len(annotations)
    detail["gsps_graphic_objects"] = sum(
        len(a.get("GraphicObjectSequence", [])) for a in annotations
    )
    detail["gsps_points"] = sum(
        int(o.NumberOfGraphicPoints)
        for a in annotations
        for o in a.get("GraphicObjectSequence", [])
    )
    images = timed("key_images", lambda: build_key_images(volume, labelmap, findings, provenance))
    sizes["key_images"] = sum(len(stored(OutputKind.KEY_IMAGES, i).data) for i in images)

    def pdf() -> bytes:
        slices = key_slices(labelmap, findings, options.key_images or 4, every=False)
        pictures = [render_slice(volume, labelmap, z, findings, provenance) for z in slices]
        return build_pdf(findings, pictures, provenance, flagged=None)

    document = timed("pdf", pdf)
    timed("pdf_dicom", lambda: encapsulate_pdf(document, provenance))
    sizes["pdf"] = len(document)
    bundle = timed(
        "fhir",
        lambda: bundle_json(
            build_bundle(findings, document, provenance, sr_uid=str(sr.SOPInstanceUID))
        ),
    )
    sizes["fhir"] = len(bundle)
    return {
        "shape": list(volume.voxels.shape),
        "segments": len(numbering.by_value),
        "seconds": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
        "runs": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "bytes": sizes,
        **detail,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each builder (3)")
    parser.add_argument("--slices-mm", type=float, default=300.0, help="CT coverage, mm (300)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = measure(args.repeat, args.models_dir, args.slices_mm)
    shape = "x".join(map(str, result["shape"]))
    print(f"{shape} phantom CT, {result['segments']} segments, median of {args.repeat}, seconds")
    print("\n| builder | seconds | bytes |\n|---|---:|---:|")
    for name, value in result["seconds"].items():
        size = result["bytes"].get(name.removesuffix("_dicom"), "")
        print(f"| {name} | {value:.3f} | {size if name != 'pdf_dicom' else ''} |")
    print(
        f"\nGSPS: {result['gsps_annotations']} annotations, {result['gsps_graphic_objects']}"
        f" graphic objects, {result['gsps_points']} points"
    )
    record = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "label": args.label,
        "machine": {"python": platform.python_version(), "cpus": platform.machine()},
        **result,
    }
    runs: list[dict[str, Any]] = []
    if args.out.exists():
        previous = json.loads(args.out.read_text())
        runs = previous.get("runs", []) if isinstance(previous, dict) else []
    runs.append(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
