"""``python -m phantom SET MODALITY FIRST LAST OUT``: write held-out or robustness cases in the
Decathlon layout (imagesTs/labelsTs + dataset.json) for ``pacs-node evaluate``.

Sets: ``heldout`` uses the training ranges; the others step outside them on purpose.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from phantom.render import DEFAULTS, modality_key, render
from phantom.writers import write_decathlon

# overrides of the modality's training ranges (phantom.render.DEFAULTS)
SETS: dict[str, dict[str, Any]] = {
    "heldout": {},
    "thin": {"thickness_mm": (0.6, 0.9), "max_slices": 200, "coverage_mm": (120.0, 180.0)},
    "thick": {"thickness_mm": (6.5, 8.0)},
    "noisy": {"noise": (45.0, 70.0)},
    "cropped": {"fov_scale": (0.6, 0.75)},
    "finepixel": {"pixel_mm": (0.35, 0.5)},
    "context": {"context": 1.0},
    "sequences": {"mr_sequences": 1.0},
    # radiographs as departments write them: extra anatomy and every department effect
    "department": {"xr_anatomy": 1.0, "xr_department": 1.0},
}


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] not in SETS:
        sys.stderr.write(f"usage: python -m phantom {{{','.join(SETS)}}} MODALITY FIRST LAST OUT\n")
        return 2
    name, modality, first, last, out = argv
    ranges = replace(DEFAULTS[modality_key(modality)], **SETS[name])
    cases = [render(modality, seed, ranges) for seed in range(int(first), int(last))]
    description = (
        f"phantom {name} set, seeds {first}..{int(last) - 1}, made with "
        f"`python -m phantom {name} {modality} {first} {last} DIR`; ranges {ranges}"
    )
    write_decathlon(Path(out), [], cases, f"{modality.lower()}_{name}", description)
    sys.stdout.write(f"wrote {len(cases)} cases to {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
