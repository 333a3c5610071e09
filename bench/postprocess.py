"""Post-processing benchmark: time and peak memory of ct-torso-organs' anatomical rules and
per-label clean-up on a long CT (default 600 slices of 512 x 512), without the network.

The input is a synthetic torso drawn slice by slice: HU image (int16, as a Volume holds CT) and
a plausible label map (uint8, as the network's labels come back on the source grid) with the
errors the rules exist for: a table labelled body, and a "lung" in the air beside the patient.
The rules and recipe are the shipped bundle's. The work runs in a fresh child process, so its
peak resident memory (VmHWM) is that process's own; ``inputs`` is the resident memory once the
inputs are built, each stage's peak is measured from there (the peak is reset between stages).

    .venv/bin/python bench/postprocess.py [--slices 600] [--size 512] [--models-dir models]

Prints a markdown table and writes bench/results/postprocess.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "postprocess.json"
MODEL = "ct-torso-organs"
SPACING = (1.0, 0.8, 0.8)  # a thin-slice torso CT: 600 slices are 60 cm


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Start a new peak: Linux resets VmHWM to the current RSS on this write."""
    Path("/proc/self/clear_refs").write_text("5")


def synthetic_torso(
    slices: int, size: int, values: dict[str, int]
) -> tuple[NDArray[np.int16], NDArray[np.uint8]]:
    """A torso from the neck to the pelvis with a table under it, in HU and as labels."""
    hu = np.full((slices, size, size), -1000, dtype=np.int16)
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    mm = SPACING[1] * size
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) * SPACING[1] - mm / 2  # mm from the centre
    rng = np.random.default_rng(5)
    for z in range(slices):
        t = z / max(slices - 1, 1)  # 0 at the top, 1 at the bottom
        a, b = 150 + 20 * np.sin(np.pi * t), 100 + 10 * np.sin(np.pi * t)

        def ellipse(cx: float, cy: float, rx: float, ry: float) -> NDArray[np.bool_]:
            return np.asarray(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1)

        body = ellipse(0, 0, a, b)
        parts: list[tuple[str, NDArray[np.bool_], int]] = [("body", body, 30)]
        if t < 0.45:
            parts += [
                ("lung_right", ellipse(-70, -10, 50, 70), -850),
                ("lung_left", ellipse(70, -10, 50, 70), -850),
                ("heart", ellipse(15, -30, 45, 40) if 0.2 < t < 0.42 else body & False, 40),
            ]
        if 0.35 < t < 0.65:
            parts += [
                ("liver", ellipse(-60, 10, 70, 60), 60),
                ("spleen", ellipse(80, 20, 30, 35), 50),
            ]
        if 0.5 < t < 0.7:
            parts += [
                ("kidney_right", ellipse(-55, 45, 22, 30), 35),
                ("kidney_left", ellipse(55, 45, 22, 30), 35),
            ]
        if t < 0.45:
            ring = ellipse(0, 0, a - 5, b - 5) & ~ellipse(0, 0, a - 15, b - 15)
            parts.append(("ribs", ring & (np.abs(np.sin(xx / 12 + z / 7)) > 0.6), 400))
        parts += [("aorta", ellipse(10, 35, 12, 12), 150), ("spine", ellipse(0, 70, 20, 20), 500)]
        slab_hu, slab_labels = hu[z], labels[z]
        for name, mask, value in parts:
            slab_hu[mask] = value
            slab_labels[mask] = values[name]
        table = (yy > b + 15) & (yy < b + 30) & (np.abs(xx) < 200)
        slab_hu[table] = 200
        slab_labels[table] = values["body"]  # the network took the table for the patient
        if 0.1 < t < 0.3:  # and a "lung" in the air beside the arm
            stray = ellipse(a + 25, -20, 15, 20)
            slab_labels[stray] = values["lung_left"]
        slab_hu += rng.normal(0, 10, slab_hu.shape).astype(np.int16)
    return hu, labels


def _one(args: argparse.Namespace) -> None:
    """Child: build the inputs, run the rules then the clean-up, print what each cost as JSON."""
    from pacs_node.imaging.postprocess import clean_segments
    from pacs_node.inference.anatomy import apply_anatomy
    from pacs_node.inference.registry import Registry

    bundle = Registry(Path(args.models_dir)).get(MODEL)
    assert bundle.anatomy is not None
    values = {s.name: s.value for s in bundle.segments}
    hu, labels = synthetic_torso(args.slices, args.size, values)
    inputs = _rss_mib("VmRSS")
    stages: list[dict[str, Any]] = []

    def stage(name: str, run: Any) -> Any:
        _reset_peak()
        before = _rss_mib("VmRSS")
        started = time.perf_counter()
        result = run()
        stages.append(
            {
                "stage": name,
                "seconds": round(time.perf_counter() - started, 2),
                "peak_rss_mib": round(_rss_mib("VmHWM"), 1),
                "peak_above_start_mib": round(_rss_mib("VmHWM") - before, 1),
            }
        )
        return result

    anatomy = bundle.anatomy
    out, removals = stage("anatomy", lambda: apply_anatomy(labels, anatomy, SPACING, hu))
    cleaned = stage("cleanup", lambda: clean_segments(out, SPACING, bundle.cleanup))
    counts = np.bincount(cleaned.ravel(), minlength=len(values) + 1)
    print(
        json.dumps(
            {
                "shape": list(labels.shape),
                "volume_mib": round((hu.nbytes + labels.nbytes) / 2**20, 1),
                "inputs_rss_mib": round(inputs, 1),
                "stages": stages,
                "removals": len(removals),
                "label_voxels": {n: int(counts[v]) for n, v in values.items()},
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _one(args)
        return
    command = [sys.executable, __file__, "--one", "--slices", str(args.slices)]
    command += ["--size", str(args.size), "--models-dir", args.models_dir]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr)
        raise SystemExit("the post-processing run failed")
    run = json.loads(child.stdout.strip().splitlines()[-1])
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "numpy": np.__version__,
        },
        "input": {"model": MODEL, "spacing_mm": list(SPACING)},
        "run": run,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"input {run['shape']}: HU + labels {run['volume_mib']:.0f} MiB, "
          f"process {run['inputs_rss_mib']:.0f} MiB once built")  # fmt: skip
    print("| stage | seconds | peak RSS MiB | peak above its start MiB |")
    print("|---|---|---|---|")
    for s in run["stages"]:
        print(
            f"| {s['stage']} | {s['seconds']:.2f} | {s['peak_rss_mib']:.0f} "
            f"| {s['peak_above_start_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
