"""An evaluation run: the model through the runner on every case, metrics per case and label,
the quality gate's verdict per case with the bundle's default limits (on labelled cases that
are all plausible, every hold is a false hold), and the report files (metrics.json, report.md,
box plots)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pacs_node.evaluation.groundtruth import read_cases
from pacs_node.evaluation.metrics import label_metrics
from pacs_node.inference.runner import Runner
from pacs_node.quality.checks import run_checks
from pacs_node.results.measurements import measure_labelmap

Progress = Callable[[int, str], None]
_KEYS = ("dice", "iou", "hd95_mm", "asd_mm", "precision", "recall")


def _mean(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return float(np.mean(real)) if real else None


def summarise(per_case: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per label: mean (and SD, median for Dice) over cases; HD95 missing counted."""
    names = sorted({n for c in per_case for n in c["labels"]}, key=lambda n: n)
    order = [n for c in per_case for n in c["labels"]]
    names = sorted(names, key=order.index)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = [c["labels"][name] for c in per_case if name in c["labels"]]
        dice = [float(r["dice"]) for r in rows]
        summary: dict[str, Any] = {
            "cases": len(rows),
            "dice_mean": float(np.mean(dice)),
            "dice_sd": float(np.std(dice)),
            "dice_median": float(np.median(dice)),
            "dice_min": float(np.min(dice)),
        }
        for key in _KEYS[1:]:
            summary[f"{key.removesuffix('_mm')}_mean"] = _mean([r[key] for r in rows])
        errors = [r["volume_error_pct"] for r in rows]
        summary["volume_error_pct_mean"] = _mean(
            [abs(e) if e is not None else None for e in errors]
        )
        summary["hd95_missing"] = sum(1 for r in rows if r["hd95_mm"] is None)
        out[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}
    return out


def evaluate(
    runner: Runner,
    model: str,
    data: Path,
    *,
    label_map: Mapping[str, int] | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Segment each case with ``model`` and measure every label both the model and the truth
    name, on the source grid (the runner maps probabilities back before argmax)."""
    bundle = runner.registry.get(model)
    model_values = {s.name: s.value for s in bundle.segments}
    modality = bundle.modalities[0] if bundle.modalities else None
    per_case: list[dict[str, Any]] = []
    for i, case in enumerate(read_cases(data, label_map, modality)):
        if limit is not None and i >= limit:
            break
        started = time.perf_counter()
        result = runner.segment(model, case.volume)
        seconds = time.perf_counter() - started
        labels = np.asarray(result.labelmap.labels)
        findings = measure_labelmap(case.volume, result.labelmap)
        verdict = run_checks(case.volume, findings, bundle.quality, result.labelmap)
        scores = {
            name: label_metrics(labels == model_values[name], mask, case.volume.spacing).as_json()
            for name, mask in case.masks.items()
            if name in model_values
        }
        per_case.append(
            {
                "case": case.case_id,
                "shape": list(case.volume.shape),
                "spacing_mm": [round(s, 4) for s in case.volume.spacing],
                "seconds": round(seconds, 2),
                "labels": scores,
                "quality": verdict.as_json(),
            }
        )
        if progress is not None:
            progress(i + 1, case.case_id)
    return {
        "model": model,
        "version": bundle.version,
        "data": str(data),
        "cases": len(per_case),
        "summary": summarise(per_case),
        "quality": quality_summary(per_case),
        "per_case": per_case,
    }


def quality_summary(per_case: list[dict[str, Any]]) -> dict[str, Any]:
    """How many cases the gate would hold (all of them plausible: the false-hold rate), and
    which checks failed how often."""
    held = [c for c in per_case if c.get("quality", {}).get("verdict") == "fail"]
    checks: dict[str, int] = {}
    for case in held:
        for failure in case["quality"]["failures"]:
            key = f"{failure['check']}:{failure['label']}"
            checks[key] = checks.get(key, 0) + 1
    return {
        "cases": len(per_case),
        "held": len(held),
        "false_hold_rate": round(len(held) / len(per_case), 4) if per_case else None,
        "failed_checks": dict(sorted(checks.items())),
    }


def markdown(report: Mapping[str, Any]) -> str:
    """The summary table and per-case Dice, for a README or a ticket."""
    lines = [
        f"# {report['model']} {report['version']} on {report['data']} ({report['cases']} cases)",
        "",
        (
            "| label | Dice mean ± SD | Dice min | IoU | HD95 mm | ASD mm | precision | recall | "
            "abs volume error % | HD95 missing |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for name, s in report["summary"].items():
        lines.append(
            f"| {name} | {s['dice_mean']:.3f} ± {s['dice_sd']:.3f} | {s['dice_min']:.3f} | "
            f"{num(s['iou_mean'])} | {num(s['hd95_mean'])} | {num(s['asd_mean'])} | "
            f"{num(s['precision_mean'])} | {num(s['recall_mean'])} | "
            f"{num(s['volume_error_pct_mean'])} | {s['hd95_missing']} |"
        )
    quality = report.get("quality")
    if quality and quality.get("cases"):
        failed = ", ".join(f"{k} ({v})" for k, v in quality["failed_checks"].items()) or "none"
        lines += [
            "",
            (
                f"Quality gate (default limits): {quality['held']} of {quality['cases']} cases "
                f"held (false-hold rate {quality['false_hold_rate']:.2f}); failed checks: {failed}."
            ),
        ]
    names = list(report["summary"])
    lines += ["", "Per case Dice:", "", "| case | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for c in report["per_case"]:
        cells = [num(c["labels"][n]["dice"]) if n in c["labels"] else "" for n in names]
        lines.append(f"| {c['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def box_plots(report: Mapping[str, Any], folder: Path) -> list[Path]:
    """dice.png and hd95.png: one box per label over the cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = list(report["summary"])
    for key, title, file in (("dice", "Dice", "dice.png"), ("hd95_mm", "HD95 (mm)", "hd95.png")):
        values = [
            [c["labels"][n][key] for c in report["per_case"]
             if n in c["labels"] and c["labels"][n][key] is not None]
            for n in names
        ]  # fmt: skip
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names)), 3.5))
        ax.boxplot(values, showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=40, ha="right")
        ax.set_title(f"{report['model']}: {title}, {report['cases']} cases")
        fig.tight_layout()
        path = folder / file
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def write_report(report: dict[str, Any], folder: Path) -> list[Path]:
    """metrics.json, report.md, dice.png and hd95.png in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(markdown(report), encoding="utf-8")
    return [folder / "metrics.json", folder / "report.md", *box_plots(report, folder)]
