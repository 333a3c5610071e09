"""Inference benchmark: per model, time and peak memory to segment a 120-slice 512x512 CT.

Each (model, device) runs in a fresh subprocess, so peak memory is that process's own
``ru_maxrss`` (torch allocates outside Python's allocator, which tracemalloc cannot see) and the
model load is a cold one. Time is split into decode (DICOM to Volume), load (bundle), preprocess,
infer and postprocess (mapping back to the source grid, clean-up).

Models: every bundle in the models folder that takes CT, plus a zoo-layout bundle with the
architecture of MONAI's spleen_ct_segmentation (UNet 16-256, 1.5 x 1.5 x 2 mm, 96^3 patches)
and seeded random weights, so the network path is timed even before trained bundles exist. On a
GPU when present.

    .venv/bin/python bench/inference.py [--models-dir models] [--slices 120] [--repeat 1]

Prints a markdown table and writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "inference.json"
ZOO_NAME = "zoo-spleen-unet-random"


def _one(args: argparse.Namespace) -> None:
    """Child: decode the series, segment it once, print timings and peak RSS as JSON."""
    from pacs_node.imaging.volume import load_series
    from pacs_node.inference.registry import Registry
    from pacs_node.inference.runner import Runner

    started = time.perf_counter()
    volume = load_series(sorted(Path(args.series).iterdir()))
    decode = time.perf_counter() - started
    runner = Runner(Registry(Path(args.models_dir)), device=args.device, threads=args.threads)
    result = runner.segment(args.one, volume)
    result.timings.decode = decode
    peak_mib = _peak_rss_mib()
    gpu_mib = 0.0
    if result.device.startswith("cuda"):
        import torch

        gpu_mib = torch.cuda.max_memory_allocated() / 2**20
    labelled = int((result.labelmap.labels > 0).sum())
    print(
        json.dumps(
            {
                "model": args.one,
                "device": result.device,
                "shape": list(volume.shape),
                "timings": result.timings.as_json(),
                "peak_rss_mib": round(peak_mib, 1),  # VmHWM
                "peak_gpu_mib": round(gpu_mib, 1),
                "labelled_voxels": labelled,
            }
        )
    )


def _peak_rss_mib() -> float:
    """This process's peak resident memory. Linux keeps ru_maxrss across exec (a child started
    by a big parent inherits its peak), so VmHWM, which belongs to this process image, comes
    first; ru_maxrss is the fallback elsewhere."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _series(directory: Path, slices: int) -> None:
    from tests.ct_phantom import make_ct_phantom, write_phantom_series

    phantom = make_ct_phantom(7, shape=(slices, 512, 512), spacing=(2.5, 0.8, 0.8), sub=1)
    write_phantom_series(phantom, directory)


def _zoo_bundle(models: Path) -> None:
    from tests.zoo_bundle import SPLEEN_LIKE_UNET, inference_config, metadata, write_bundle

    write_bundle(
        models / ZOO_NAME,
        inference_config(SPLEEN_LIKE_UNET),
        metadata({"0": "background", "1": "spleen"}),
        seed=0,
    )


def _link_models(source: Path, target: Path) -> list[str]:
    """The bundles that take CT (the benchmark's input), linked into ``target``."""
    from pacs_node.inference.registry import Registry

    registry = Registry(source)
    takes = {n: registry.get(n).modalities for n in registry.names()}
    names = [n for n, modalities in takes.items() if not modalities or "CT" in modalities]
    for name in names:
        (target / name).symlink_to((source / name).resolve(), target_is_directory=True)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-zoo", action="store_true", help="skip the zoo-layout UNet")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--write-series", help=argparse.SUPPRESS)
    parser.add_argument("--series", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _one(args)
        return
    if args.write_series:  # in a child, so the parent's peak memory stays small
        _series(Path(args.write_series), args.slices)
        return

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pacs-node-bench-") as tmp:
        work = Path(tmp)
        series = work / "series"
        print(f"writing a {args.slices}-slice 512x512 CT phantom ...", file=sys.stderr)
        command = [sys.executable, __file__, "--write-series", str(series)]
        subprocess.run([*command, "--slices", str(args.slices)], check=True)
        models = work / "models"
        models.mkdir()
        names = _link_models(Path(args.models_dir), models)
        if not args.no_zoo:
            _zoo_bundle(models)
            names.append(ZOO_NAME)
        for device in devices:
            for name in names:
                for run in range(args.repeat):
                    print(f"{name} on {device}, run {run + 1} ...", file=sys.stderr)
                    child = subprocess.run(
                        [sys.executable, __file__, "--one", name, "--series", str(series),
                         "--models-dir", str(models), "--device", device,
                         "--threads", str(args.threads)],
                        capture_output=True, text=True, check=False,
                    )  # fmt: skip
                    if child.returncode != 0:
                        print(child.stderr, file=sys.stderr)
                        raise SystemExit(f"{name} on {device} failed")
                    rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "input": {
            "slices": args.slices,
            "rows": 512,
            "columns": 512,
            "spacing_mm": [2.5, 0.8, 0.8],
        },
        "runs": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print("| model | device | decode s | load s | preprocess s | infer s | postprocess s "
          "| total s | peak RSS MiB | peak GPU MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["timings"]
        print(
            f"| {r['model']} | {r['device']} | {t['decode_s']:.2f} | {t['load_s']:.2f} "
            f"| {t['preprocess_s']:.2f} | {t['infer_s']:.2f} | {t['postprocess_s']:.2f} "
            f"| {t['total_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['peak_gpu_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
