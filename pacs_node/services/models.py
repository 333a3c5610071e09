"""The installed model bundles, and whether the allowlist lets each run."""

from __future__ import annotations

from dataclasses import dataclass

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
