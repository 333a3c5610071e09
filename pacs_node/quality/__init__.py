"""The quality gate: plausibility checks on every result before it leaves the node.

:mod:`.limits` holds the limits (a bundle's ``pacs_node.quality``, a route's ``qa_limits``),
:mod:`.checks` the checks themselves (pure: findings and the input volume in, a verdict out).
"""

from __future__ import annotations

from pacs_node.quality.limits import QaMode, QualityLimits, merge_limits

__all__ = ["QaMode", "QualityLimits", "merge_limits"]
