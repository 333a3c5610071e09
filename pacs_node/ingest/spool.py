"""The spool: received instances as files, written atomically, named only by validated UIDs.

A file in the spool is the durable record that an instance was acknowledged: it is written to a
temporary file, fsync'd, then hard-linked to its final name (which never overwrites: the first
copy of a SOP Instance wins) and its directory fsync'd, all before the SCP answers success.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pacs_node.errors import OutOfResources
from pacs_node.uids import require_uid

log = logging.getLogger(__name__)

INCOMING = ".incoming"
SUFFIX = ".dcm"
_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE}


@dataclass(frozen=True, slots=True)
class StoredFile:
    relpath: str
    size_bytes: int
    duplicate: bool  # an instance with the same UIDs was already in the spool; kept the first


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = root
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.incoming = root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)

    def relpath_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """``<study>/<series>/<sop>.dcm``; every part is a validated UID (digits and dots)."""
        parts = (
            require_uid(study_uid, "StudyInstanceUID"),
            require_uid(series_uid, "SeriesInstanceUID"),
            require_uid(sop_instance_uid, "SOPInstanceUID") + SUFFIX,
        )
        return "/".join(parts)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def _check_free_space(self) -> None:
        if self.min_free_bytes <= 0:
            return
        stats = os.statvfs(self.root)
        free = stats.f_bavail * stats.f_frsize
        if free < self.min_free_bytes:
            floor = self.min_free_bytes // 2**20
            raise OutOfResources(f"spool has {free // 2**20} MiB free, below the {floor} MiB floor")

    def store(
        self,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        chunks: Iterable[bytes | memoryview],
    ) -> StoredFile:
        """Write ``chunks`` durably under the instance's name; never a partial or replaced file."""
        relpath = self.relpath_for(study_uid, series_uid, sop_instance_uid)
        final = self.root / relpath
        if final.exists():
            return StoredFile(relpath, final.stat().st_size, duplicate=True)
        self._check_free_space()
        fd, tmp_name = tempfile.mkstemp(dir=self.incoming, suffix=".part")
        tmp = Path(tmp_name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    size += len(chunk)
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            created = self._make_dirs(final.parent)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return StoredFile(relpath, final.stat().st_size, duplicate=True)
            if self.fsync:
                for directory in (final.parent, *created):
                    _fsync_dir(directory)
            return StoredFile(relpath, size, duplicate=False)
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                raise OutOfResources(f"spool write failed: {os.strerror(exc.errno or 0)}") from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def adopt(
        self, temporary: Path, study_uid: str, series_uid: str, sop_instance_uid: str
    ) -> StoredFile:
        """Make ``temporary`` (a whole Part 10 file written in :attr:`incoming`) the instance's
        spool file: fsync'd, then hard-linked under its name like :meth:`store`; never a
        partial or replaced file. ``temporary`` is gone afterwards, whatever happened."""
        try:
            relpath = self.relpath_for(study_uid, series_uid, sop_instance_uid)
            final = self.root / relpath
            if final.exists():
                return StoredFile(relpath, final.stat().st_size, duplicate=True)
            self._check_free_space()
            size = temporary.stat().st_size
            if self.fsync:
                fd = os.open(temporary, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            created = self._make_dirs(final.parent)
            try:
                os.link(temporary, final)
            except FileExistsError:
                return StoredFile(relpath, final.stat().st_size, duplicate=True)
            if self.fsync:
                for directory in (final.parent, *created):
                    _fsync_dir(directory)
            return StoredFile(relpath, size, duplicate=False)
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                raise OutOfResources(f"spool write failed: {os.strerror(exc.errno or 0)}") from exc
            raise
        finally:
            temporary.unlink(missing_ok=True)

    def _make_dirs(self, directory: Path) -> list[Path]:
        """Create ``directory`` and missing parents; return the parents whose entries changed."""
        changed: list[Path] = []
        missing: list[Path] = []
        current = directory
        while not current.exists() and current != self.root:
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            changed.append(path.parent)
        return changed

    def remove(self, relpath: str) -> None:
        (self.root / relpath).unlink(missing_ok=True)

    def clean_incoming(self) -> int:
        """Delete temporary files left by a crash; none of them was ever acknowledged."""
        removed = 0
        for leftover in self.incoming.glob("*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def walk(self) -> Iterator[str]:
        """Relative paths of every stored instance."""
        for study in os.scandir(self.root):
            if not study.is_dir() or study.name == INCOMING:
                continue
            for series in os.scandir(study.path):
                if not series.is_dir():
                    continue
                for entry in os.scandir(series.path):
                    if entry.name.endswith(SUFFIX) and entry.is_file():
                        yield f"{study.name}/{series.name}/{entry.name}"
