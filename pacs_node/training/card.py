"""The model card (docs/README.md) of a bundle trained here, rebuilt from what the bundle holds:
its recipe and training summary (configs/metadata.json) and every evaluation saved under
``eval/<set>/metrics.json``. Numbers are never typed in by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pacs_node.training.bundle import NOT_CLINICAL, SCHEDULE

EVAL_DIR = "eval"
METRICS = "metrics.json"


def _table(summary: dict[str, Any]) -> list[str]:
    rows = [
        (
            "| label | Dice | IoU | HD95 mm | ASD mm | precision | recall | abs volume error % "
            "| HD95 missing |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        rows.append(
            f"| {name} | {s['dice_mean']:.3f} ± {s['dice_sd']:.3f} | {s['iou_mean']:.3f} | "
            f"{_num(s['hd95_mean'])} | {_num(s['asd_mean'])} | {s['precision_mean']:.3f} | "
            f"{s['recall_mean']:.3f} | {_num(s['volume_error_pct_mean'])} | {s['hd95_missing']} |"
        )
    return rows


def _cleanup(cleanup: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """The bundle's per-label clean-up in words, in label order."""
    words = {
        "largest_component": "largest component",
        "fill_holes": "holes filled",
        "min_volume_ml": "islands under {} mL removed",
        "min_voxels": "islands under {} voxels removed",
        "smoothing_mm": "smoothed ({} mm)",
    }
    parts = []
    for value in sorted(cleanup, key=int):
        steps = [
            words[k].format(v) if "{}" in words[k] else words[k]
            for k, v in cleanup[value].items()
            if v is not False and k in words
        ]
        parts.append(f"{labels.get(value, value)} {', '.join(steps)}")
    return "; ".join(parts) if parts else "none"


def _anatomy(rules: dict[str, Any] | None) -> str:
    """The bundle's anatomical limits (pacs_node.anatomy) in words."""
    if not rules:
        return "none"
    parts = []
    if rules.get("exclude_table"):
        parts.append(f"`{rules['body']}` only within the patient (CT: table and air left out)")
    if rules.get("confine_to_body"):
        parts.append(
            "the other labels only inside the patient's outline and surrounded mostly by tissue"
        )
    if rules.get("air_only"):
        names = ", ".join(f"`{n}`" for n in rules["air_only"])
        parts.append(f"{names} only where the CT holds air (< {rules.get('air_hu_max', -400)} HU)")
    return "; ".join(parts)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_card(root: Path) -> str:
    """Markdown for ``root``'s docs/README.md."""
    meta = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    node = meta["pacs_node"]
    training = node["training"]
    recipe = training["recipe"]
    labels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    lines = [
        f"# {meta['name']} {meta['version']}",
        "",
        meta.get("description", ""),
        "",
        NOT_CLINICAL,
        "",
        "## What it does",
        "",
        f"- Input: {', '.join(node['modalities'])}; labels: "
        + ", ".join(f"{k} {v}" for k, v in labels.items() if k != "0"),
        (
            f"- Grid: resampled to {node['preprocessing']['spacing_zyx_mm']} mm (z, y, x) in LPS; "
            f"intensity {node['preprocessing']['intensity']}; sliding window "
            f"{node['patch_size']} (x, y, z); probabilities mapped back to the source grid."
        ),
        (
            f"- Network: MONAI UNet, channels {recipe['network']['channels']}, "
            f"{training['parameters']:,} parameters."
        ),
        f"- Anatomical limits, before the clean-up: {_anatomy(node.get('anatomy'))}.",
        f"- Clean-up after inference: {_cleanup(node.get('cleanup', {}), labels)}.",
        *(
            [f"- Changes in {meta['version']}: {meta['changelog'][meta['version']]}."]
            if meta["version"] in meta.get("changelog", {})
            else []
        ),
        "",
        "## Training data and recipe",
        "",
        (
            f"- Procedural phantoms (`models/phantom`), {recipe['modality']}, training seeds "
            f"{recipe['train_seeds'][0]}..{recipe['train_seeds'][1] - 1}, validation seeds "
            f"{recipe['val_seeds'][0]}..{recipe['val_seeds'][1] - 1}; phantom ranges: the "
            f"modality's training ranges (`phantom.render.DEFAULTS`) with "
            f"{recipe['phantom'] or 'no overrides'}."
        ),
        f"- Augmentation: {recipe['augmentation']}.",
        (
            "- Loss Dice + cross-entropy"
            + (
                " on label fractions (the share of each model voxel every label covers)"
                if recipe.get("soft_labels")
                else ""
            )
            + ", AdamW, learning-rate schedule: "
            f"{training.get('schedule', SCHEDULE)}, peak "
            f"{recipe['learning_rate']}, batch {recipe['batch_size']}, {recipe['steps_per_epoch']} "
            f"steps per epoch, early stopping after {recipe['patience']} epochs without gain."
        ),
        (
            f"- Ran {training['epochs_run']} epochs (best {training['best_epoch']}, validation "
            f"Dice {training['val_dice']}) in {training['minutes']} min on {training['machine']}."
        ),
        "",
        *(
            [f"- Started from the weights of `{training['initialised_from']}` (see below).", ""]
            if training.get("initialised_from")
            else []
        ),
        *([f"- {training['note']}", ""] if training.get("note") else []),
        (
            "Retrain (same seeds: the same result up to thread scheduling on the CPU, a close "
            "one on a GPU):"
        ),
        "",
        "```",
        *training.get("commands", [f"pacs-node train models/recipes/{meta['name']}.yaml"]),
        "```",
        "",
        "## Held-out evaluation",
        "",
    ]
    found = (root / EVAL_DIR).glob(f"*/{METRICS}") if (root / EVAL_DIR).is_dir() else []
    # the held-out set (training ranges) first, then the robustness sets outside them
    evals = sorted(found, key=lambda p: (p.parent.name != "heldout", p.parent.name))
    if not evals:
        lines.append("No evaluation saved yet (`pacs-node evaluate`).")
    for path in evals:
        report = json.loads(path.read_text(encoding="utf-8"))
        ran = report.get("version", meta["version"])
        lines += [
            f"### {path.parent.name}: {report['cases']} cases"
            + ("" if ran == meta["version"] else f" (model {ran})"),
            "",
            report.get("description", ""),
            "",
            f"`{report.get('command', '')}`",
            "",
            *_table(report["summary"]),
            "",
        ]
    lines += _quality(root, node.get("quality"), node.get("quality_note"))
    lines += [
        "## Known limits",
        "",
        (
            "- Trained only on phantoms: real anatomy varies more (pathology, post-operative "
            "states, arms beside the body, contrast timing, devices); expect lower numbers on "
            "real data."
        ),
        *(
            ["- `body` is the body outside the other labels (one label per voxel)."]
            if "body" in labels.values()
            else []
        ),
        *(
            [
                (
                    "- The clean-up keeps the body's largest piece: arms imaged apart from the "
                    "trunk (the phantoms have none) would be dropped from `body`."
                )
            ]
            if any(
                labels.get(value) == "body" and steps.get("largest_component")
                for value, steps in node.get("cleanup", {}).items()
            )
            else []
        ),
        (
            "- Left and right on a radiograph: the node checks each lung's side against Patient "
            "Orientation (0020,0020) and warns on a mismatch, or when the image has none."
            if recipe["network"].get("two_d")
            else "- Left and right follow the patient LPS axes of the DICOM geometry; a wrong "
            "ImageOrientationPatient gives swapped sides."
        ),
        *(f"- {text}" for text in node.get("known_limits", [])),
        "",
    ]
    return "\n".join(lines)


def _quality(root: Path, limits: dict[str, Any] | None, note: str | None) -> list[str]:
    """The gate's default limits in words and its verdicts on phantom sets (``eval/gate/``,
    written by ``python -m pacs_node.quality.calibrate ... --check``)."""
    if not limits:
        return []
    sizes = ", ".join(
        f"{name} {r.get('min', 0)}-{r['max']}" if isinstance(r, dict) else f"{name} {r[0]}-{r[1]}"
        for name, r in sorted(limits.get("sizes", {}).items())
    )
    source = limits.get("intensity", {}).get("source", "")
    lines = [
        "## Quality gate",
        "",
        (
            "Default limits (`pacs_node.quality` in configs/metadata.json), derived from this "
            "model's results on phantom renders it was not trained on"
            + (f" with `{source}`" if source else "")
            + " (rules: `pacs_node/quality/calibrate.py`; a route may override them with "
            "`qa_limits`):"
        ),
        "",
        (
            f"- normal sizes: {sizes or 'none'} (mL in 3D, cm2 on radiographs; no floor for an "
            "organ a face of the series cuts: its first or last slice, or the field's edge)"
        ),
        f"- left/right pairs: larger at most {limits.get('pair_ratio_max')} x the smaller",
    ]
    if limits.get("sides"):
        lines.append(
            "- sides: "
            + ", ".join(f"{n} on the patient's {s}" for n, s in sorted(limits["sides"].items()))
        )
    if limits.get("order"):
        lines.append(
            "- above: " + ", ".join(f"{o['upper']} above {o['lower']}" for o in limits["order"])
        )
    if limits.get("max_components"):
        lines.append(
            "- at most pieces: "
            + ", ".join(f"{n} {k}" for n, k in sorted(limits["max_components"].items()))
        )
    if limits.get("min_slices"):
        lines.append(f"- a label in at least {limits['min_slices']} inner slices")
    if limits.get("max_image_fraction") is not None:
        lines.append(
            f"- no label but the body over {limits['max_image_fraction']:.0%} of the image"
        )
    intensity = limits.get("intensity")
    if intensity:
        lines.append(
            "- input percentiles "
            + "/".join(f"P{p:g}" for p in intensity["percentiles"])
            + ": "
            + ", ".join(f"{v:g}" for v in intensity["reference"])
            + f" +/- {intensity['tolerance']:g} (inside the body: HU on CT, else the image "
            "scaled to its own 1st-99th percentile range)"
        )
    reports = sorted((root / "eval" / "gate").glob("*.json"))
    if reports:
        lines += [
            "",
            (
                "Gate verdicts on phantom sets: on held-out renders and demo studies every "
                "result is plausible, so every hold is a false hold; on a robustness set "
                "(MODALITY:SET) the model may fail, and a hold may be a true one:"
            ),
            "",
            ("| renders (modality, seeds from, to) | held | hold rate | failed checks | command |"),
            "|---|---|---|---|---|",
        ]
        for path in reports:
            report = json.loads(path.read_text(encoding="utf-8"))
            failed = ", ".join(f"{k} ({v})" for k, v in report["failed_checks"].items())
            lines.append(
                f"| {'; '.join(report.get('sets', []))} | {report['held']} of {report['cases']} "
                f"| {report['false_hold_rate']:.2f} | {failed or 'none'} | "
                f"`{report['command']}` |"
            )
    if note:
        lines += ["", note]
    return [*lines, ""]


def refresh_card(root: Path) -> None:
    """Rewrite docs/README.md from the bundle's own files."""
    (root / "docs" / "README.md").write_text(render_card(root), encoding="utf-8")


def overview(roots: list[Path]) -> str:
    """One table over built-in models: mean Dice per label on each saved evaluation set
    (held-out first), for the README."""
    lines: list[str] = []
    for root in roots:
        folder = root / EVAL_DIR
        if not folder.is_dir():
            continue
        found = sorted(
            folder.glob(f"*/{METRICS}"), key=lambda p: (p.parent.name != "heldout", p.parent.name)
        )
        reports = [(p.parent.name, json.loads(p.read_text(encoding="utf-8"))) for p in found]
        if not reports:
            continue
        sets = [f"{name} ({r['cases']})" for name, r in reports]
        lines += [f"`{root.name}`, mean Dice (cases):", "", "| label | " + " | ".join(sets) + " |"]
        lines.append("|---" * (len(sets) + 1) + "|")
        for label in reports[0][1]["summary"]:
            cells = [
                f"{r['summary'][label]['dice_mean']:.3f}" if label in r["summary"] else ""
                for _, r in reports
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
