"""Why a person withdraws a result: the titles IHE IOCM gives a rejection (PS3.16 CID 7011),
named once for the catalog's events, the rejection note and the doors."""

from __future__ import annotations

import enum


class RejectionKind(enum.StrEnum):
    """``quality``: the result is wrong; ``patient-safety``: it belongs to another patient."""

    QUALITY = "quality"
    PATIENT_SAFETY = "patient-safety"

    @property
    def code(self) -> str:
        """The title's code value (scheme DCM)."""
        return "113037" if self is RejectionKind.PATIENT_SAFETY else "113001"

    @property
    def meaning(self) -> str:
        if self is RejectionKind.PATIENT_SAFETY:
            return "Rejected for Patient Safety Reasons"
        return "Rejected for Quality Reasons"
