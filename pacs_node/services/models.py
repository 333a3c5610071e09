"""The installed model bundles, whether the allowlist lets each run, their cards and held-out
metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pacs_node.config import Settings
from pacs_node.inference.registry import Bundle, Registry
from pacs_node.services.timeline import JsonValue


@dataclass(frozen=True, slots=True)
class ModelEntry:
    bundle: Bundle
    allowed: bool  # the allowlist is empty or lists the bundle's SHA-256

    def as_json(self) -> dict[str, JsonValue]:
        return {**self.bundle.as_json(), "allowed": self.allowed}


def list_models(settings: Settings) -> list[ModelEntry]:
    """Every bundle under the models folder; a broken one raises (naming file and key)."""
    allowlist = settings.node.model_sha256_allowlist
    return [
        ModelEntry(bundle, not allowlist or bundle.sha256 in allowlist)
        for bundle in Registry(settings.node.models_dir).load_all()
    ]


# Where a bundle keeps its saved evaluations (``pacs-node evaluate``, the model card's tables):
# ``eval/<set>/metrics.json``; ``heldout`` is the set drawn from the training ranges.
HELD_OUT_METRICS = Path("eval/heldout/metrics.json")


@dataclass(frozen=True, slots=True)
class ModelDetail:
    """A bundle as a reader of its card wants it: the entry, the card's text, what the model
    is for, and its held-out metrics per label (None when none were saved)."""

    entry: ModelEntry
    description: str
    intended_use: str | None
    card: str | None
    held_out_cases: int | None
    held_out: dict[str, dict[str, float]] | None


def _held_out(bundle: Bundle) -> tuple[int | None, dict[str, dict[str, float]] | None]:
    path = bundle.root / HELD_OUT_METRICS
    if not path.is_file():
        return None, None
    report = json.loads(path.read_text(encoding="utf-8"))
    summary = {
        label: {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        for label, values in report.get("summary", {}).items()
    }
    return int(report.get("cases", 0)), summary


def model_details(settings: Settings) -> list[ModelDetail]:
    """Every bundle with its card and held-out metrics (see :func:`list_models`)."""
    details = []
    for entry in list_models(settings):
        bundle = entry.bundle
        card = bundle.model_card
        cases, held_out = _held_out(bundle)
        intended = bundle.metadata.get("intended_use")
        details.append(
            ModelDetail(
                entry=entry,
                description=bundle.description,
                intended_use=intended if isinstance(intended, str) else None,
                card=card.read_text(encoding="utf-8") if card is not None else None,
                held_out_cases=cases,
                held_out=held_out,
            )
        )
    return details
