"""DICOM files on a disk seen as routing would see them once the node had received them.

Files are grouped into studies and series by their UIDs, a SOP Instance UID met twice counts
once, and each series is read as :func:`~pacs_node.routing.facts.series_facts` reads one from the
catalog: the same leading and ending headers, the same attributes, taken by the same
:func:`~pacs_node.ingest.header.read_routing_header` the receive path uses. Only headers are
read (never pixel data), and a file that is not DICOM, or that the node would refuse, is skipped
with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_node.errors import IngestError
from pacs_node.ingest.header import (
    read_header,
    read_received_file,
    read_spooled_header,
)
from pacs_node.ingest.routing_header import read_routing_header
from pacs_node.refs import RoutingHeader, header_order
from pacs_node.routing.facts import SeriesSample, series_facts, series_order
from pacs_node.routing.rules import SeriesFacts

# Grouping needs the UIDs and the Instance Number only: groups 0008-0020.
_LAST_GROUP_FOR_GROUPING = 0x0020


def _past_identifiers(tag: Any, _vr: Any, _length: Any) -> bool:
    return int(tag.group) > _LAST_GROUP_FOR_GROUPING


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass(frozen=True)
class FileStudy:
    study_uid: str
    series: tuple[SeriesFacts, ...]
    instances: int


@dataclass
class _Series:
    study_uid: str
    instances: list[tuple[tuple[bool, int, str], Path]] = field(default_factory=list)


def walk(paths: Sequence[Path]) -> Iterator[Path]:
    """Every file under ``paths`` (folders recursively, symbolic links to folders not
    followed), in a stable order."""
    for path in paths:
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    yield Path(root) / name
        else:
            yield path


def _reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError | PermissionError):
        return f"cannot be read ({type(exc).__name__})"
    return str(exc) or type(exc).__name__


def read_studies(
    paths: Sequence[Path], calling_ae: str | None = None
) -> tuple[list[FileStudy], list[Skipped]]:
    """The studies in ``paths`` with each series' facts, and the files left out and why."""
    series: dict[str, _Series] = {}
    seen: dict[str, Path] = {}
    skipped: list[Skipped] = []
    for path in walk(paths):
        try:
            header = read_header(read_spooled_header(path, _past_identifiers))
        except (OSError, ValueError, IngestError) as exc:
            skipped.append(Skipped(path, _reason(exc)))
            continue
        if header.sop_instance_uid in seen:
            other = seen[header.sop_instance_uid]
            skipped.append(Skipped(path, f"same SOP Instance UID as {other}: counted once"))
            continue
        held = series.get(header.series_uid)
        if held is not None and held.study_uid != header.study_uid:
            reason = (
                f"its Series Instance UID belongs to study {held.study_uid}: the node refuses it"
            )
            skipped.append(Skipped(path, reason))
            continue
        seen[header.sop_instance_uid] = path
        entry = series.setdefault(header.series_uid, _Series(header.study_uid))
        entry.instances.append(
            (header_order(header.instance_number, header.sop_instance_uid), path)
        )
    studies: dict[str, list[SeriesFacts]] = {}
    counts: dict[str, int] = {}
    for series_uid, entry in series.items():
        ordered = sorted(entry.instances)
        first = _routing_header(ordered[0][1])
        last = first if len(ordered) == 1 else _routing_header(ordered[-1][1])
        sample = SeriesSample(series_uid, len(ordered), first, last, calling_ae)
        studies.setdefault(entry.study_uid, []).append(series_facts(sample))
        counts[entry.study_uid] = counts.get(entry.study_uid, 0) + len(ordered)
    found = [
        FileStudy(uid, tuple(sorted(facts, key=series_order)), counts[uid])
        for uid, facts in sorted(studies.items())
    ]
    return found, skipped


def _routing_header(path: Path) -> RoutingHeader:
    """The attributes routing reads, as the receive path takes them; the file was readable a
    moment ago, so a failure now (it changed or went away) leaves the header empty, as an
    unreadable spool file does."""
    try:
        return read_routing_header(read_received_file(path))
    except (OSError, ValueError, IngestError):
        return RoutingHeader()
