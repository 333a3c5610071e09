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
