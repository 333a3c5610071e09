"""The spool: received instances as files, written atomically, named only by validated UIDs.

A file in the spool is the durable record that an instance was acknowledged: it is written to a
temporary file, fsync'd, then hard-linked to its final name (which never overwrites: the first
copy of a SOP Instance wins) and its directory fsync'd, all before the SCP answers success.
Threads that wait on the same directory share its fsyncs (:func:`sync_directory`): one that
starts after a thread's link covers it, so associations writing one series wait on fewer.

The SHA-256 of the data set (the bytes after the Part 10 header, which the node writes itself
and which names the calling AE) is computed while writing. When the name is taken, the digests
are compared: the same data set is a duplicate; another one is never dropped but linked, just as
durably, into the quarantine area (``.quarantine/<SOP Instance UID>/<sha256>.dcm``), where
:mod:`pacs_node.ingest.identity` applies ``resend_policy`` to it. Nothing under a name starting
with a dot is part of any study (:meth:`Spool.walk` skips them).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pacs_node.errors import OutOfResources
from pacs_node.ingest.retention_lock import retention_lock as process_retention_lock
from pacs_node.uids import require_uid

log = logging.getLogger(__name__)

INCOMING = ".incoming"
NODE_PREFIX = "node."  # .incoming/node.<node_id>/: one node's partial files
QUARANTINE = ".quarantine"
LOCK_FILE = ".lock"
SUFFIX = ".dcm"
_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE}
_PART10_PREFIX = 128 + 4  # preamble and "DICM"
_GROUP_LENGTH_END = _PART10_PREFIX + 12  # (0002,0000) UL, explicit VR little endian
_READ_CHUNK = 1 << 20
SYNC_THREADS = 16  # fsync threads of a spool not told its association cap


@dataclass(frozen=True, slots=True)
class StoredFile:
    relpath: str
    size_bytes: int
    duplicate: bool  # an instance with the same UIDs was already in the spool; kept the first
    sha256: str = ""  # of the data set written (see the module docstring)
    # When the name was taken by another data set: where these bytes were kept instead
    # (a path under the quarantine area); None when they were written or were identical.
    held: str | None = None
    held_new: bool = False  # ``held`` was linked by this call (not an earlier identical copy)

    @property
    def identical(self) -> bool:
        """A second copy of the very data set already stored under this name."""
        return self.duplicate and self.held is None


class DataSetDigest:
    """SHA-256 of a Part 10 file's data set, fed in chunks: the group 0002 header is skipped
    (the node writes it, with the calling AE), so a re-send from another AE compares equal.
    Bytes without a Part 10 header are hashed whole."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self._skip: int | None = None
        self._seen = 0

    def update(self, chunk: bytes | memoryview) -> None:
        if self._skip is None:
            self._head += chunk
            if len(self._head) < _GROUP_LENGTH_END:
                return
            head, self._head = bytes(self._head), bytearray()
            self._skip = _header_length(head)
            self._seen = 0
            chunk = head
        start = max(0, self._skip - self._seen)
        self._seen += len(chunk)
        if start < len(chunk):
            self._hash.update(memoryview(chunk)[start:])

    def hexdigest(self) -> str:
        if self._skip is None:  # shorter than a Part 10 header
            self._hash.update(self._head)
            self._skip, self._head = 0, bytearray()
        return self._hash.hexdigest()


def _header_length(head: bytes) -> int:
    if head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        return 0
    (group_length,) = struct.unpack_from("<I", head, _PART10_PREFIX + 8)
    return int(_GROUP_LENGTH_END + group_length)


def retention_lock(root: Path, *, shared: bool) -> contextlib.AbstractContextManager[None]:
    """Held shared while an acknowledgement relies on a spool file, exclusively while retention
    removes a study's rows or files (:mod:`pacs_node.ingest.retention_lock`)."""
    return process_retention_lock(root / LOCK_FILE, shared=shared)


def file_digest(path: Path) -> str:
    """:class:`DataSetDigest` of a stored file."""
    digest = DataSetDigest()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def incoming_folder(root: Path, node_id: str) -> Path:
    """Where the node ``node_id`` writes its partial files (``.incoming/node.<node_id>``), so
    that on a shared data path a starting node can tell its own leftovers from the files other
    nodes are writing; ``""``: ``.incoming`` itself (a tool, not a node). The name is lower
    case, with ``-`` for each character SMB and Azure Files refuse (the default node_id has
    a ``:``), the same on every share whatever its case rules."""
    if not node_id:
        return root / INCOMING
    return root / INCOMING / f"{NODE_PREFIX}{_UNSHARABLE.sub('-', node_id).lower()}"


_UNSHARABLE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def temporary_part(directory: Path) -> tuple[int, str]:
    """``mkstemp`` a ``.part`` file in ``directory``, making the folder again when it is gone
    (removed by an operator, or by an older node version starting beside this one): a missing
    folder must never fail a store."""
    try:
        return tempfile.mkstemp(dir=directory, suffix=".part")
    except FileNotFoundError:
        directory.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=directory, suffix=".part")


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SyncPool:
    """The threads that fsync received files while their handlers read them, and the slots
    that bound how many such fsyncs are outstanding (queued or running): a handler takes a slot
    before its job is queued, so a peer that floods the node waits for slots instead of growing
    the queue, and every job frees its slot when it ends or is cancelled."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool-fsync")
        # Running ones and as many queued (opened by no one yet: a refused file's is cancelled).
        self.capacity = 2 * threads
        self.slots = threading.BoundedSemaphore(self.capacity)


_pool: _SyncPool | None = None
_pool_lock = threading.Lock()


def _syncer(threads: int) -> _SyncPool:
    """The process's pool, made (under a lock) with ``threads`` workers: one per association
    the process may hold, each of which has at most one received file's fsync outstanding.
    A larger request replaces the pool; the old one finishes what it was given."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.threads < threads:
            old, _pool = _pool, _SyncPool(threads)
            if old is not None:
                old.executor.shutdown(wait=False)
        return _pool


class FileSync:
    """One received file's fsync on the helper pool (:meth:`Spool.start_sync`). The file is
    opened by the worker, so a job still queued holds no descriptor; :meth:`settle` cancels
    it (no fsync of a file about to be deleted) or waits for a running one."""

    def __init__(self, path: Path, pool: _SyncPool) -> None:
        self.path = path
        self._slots = pool.slots
        self._lock = threading.Lock()
        self._released = False
        self._future: Future[None] = pool.executor.submit(self._run)

    def _run(self) -> None:
        try:
            _fsync_and_close(os.open(self.path, os.O_RDONLY))
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._slots.release()

    def cancelled(self) -> bool:
        """Settled before it started: the file was never opened here."""
        return self._future.cancelled()

    def result(self, timeout: float | None = None) -> None:
        """Wait for the fsync; raise its OSError, if any."""
        self._future.result(timeout)

    def settle(self) -> None:
        """For a file that will not be kept: cancel the job if it has not started, else wait
        for it to end (its error does not matter any more). Idempotent."""
        if self._future.cancel():
            self._release()
            return
        with contextlib.suppress(Exception):
            self._future.result()


@dataclass(slots=True)
class _FailedSync:
    """A directory fsync that failed, and the requests it was to make durable."""

    first: int
    last: int
    error: BaseException
    pending: int  # of those requests, how many have not yet been told


def _failure_for(error: BaseException) -> OSError:
    """The OSError a waiter covered by a failed directory fsync raises (its own object: the
    same exception is not raised in several threads)."""
    if isinstance(error, OSError) and error.errno is not None:
        copy = OSError(error.errno, error.strerror, error.filename)
    else:
        copy = OSError(errno.EIO, f"directory fsync failed: {type(error).__name__}")
    copy.__cause__ = error
    return copy


class _GroupSync:
    """One directory's fsyncs, grouped: a caller whose entry is linked asks for a sync; if one
    is running, it waits for the next, which starts after its request and so covers its entry,
    and every caller that asked before that one started is released by it.

    A failed fsync settles every request it covered as failed: each of those callers raises
    its error. (A fresh fsync on a new descriptor may not see a write-back error that the
    failed one already reported, so it could never vouch for those entries.) Only requests
    made after the failure can be covered by a later fsync."""

    def __init__(self) -> None:
        self.done = threading.Condition()
        self.requested = 0  # requests so far
        self.settled = 0  # every request up to this one has its outcome
        self.running = False
        self.users = 0  # callers between sync_directory's entry and exit
        self.failures: list[_FailedSync] = []

    def sync(self, path: Path) -> None:
        with self.done:
            self.requested += 1
            mine = self.requested
            while self.settled < mine:
                if self.running:
                    self.done.wait()
                    continue
                self.running = True
                first = self.settled + 1
                covers = self.requested  # read before the fsync starts: all linked by now
                self.done.release()
                error: BaseException | None = None
                try:
                    _fsync_dir(path)
                except BaseException as exc:
                    error = exc
                self.done.acquire()
                if error is not None:
                    pending = covers - first  # the others; this caller raises below
                    if pending:
                        self.failures.append(_FailedSync(first, covers, error, pending))
                self.settled = covers
                self.running = False
                self.done.notify_all()
                if error is not None:
                    raise error
            self._raise_if_failed(mine)

    def _raise_if_failed(self, request: int) -> None:
        """Raise the error of the failed fsync that covered ``request``, if one did."""
        for failure in self.failures:
            if failure.first <= request <= failure.last:
                failure.pending -= 1
                if failure.pending == 0:
                    self.failures.remove(failure)
                raise _failure_for(failure.error)


_groups: dict[str, _GroupSync] = {}
_groups_lock = threading.Lock()


def sync_directory(path: Path) -> None:
    """fsync ``path`` (a directory whose entry the caller just made), grouped with the other
    threads of this process that wait on the same directory (:class:`_GroupSync`): with several
    associations writing one series, one fsync makes several names durable."""
    key = os.fspath(path)
    with _groups_lock:
        group = _groups.get(key)
        if group is None:
            group = _groups[key] = _GroupSync()
        group.users += 1
    try:
        group.sync(path)
    finally:
        with _groups_lock:
            group.users -= 1
            if group.users == 0:
                del _groups[key]


def _remove_parts(folder: Path, cutoff: float | None) -> int:
    """Remove the ``*.part`` files of ``folder`` last modified before ``cutoff`` (all: None)."""
    removed = 0
    for leftover in folder.glob("*.part"):
        try:
            if cutoff is not None and leftover.stat().st_mtime >= cutoff:
                continue
            leftover.unlink()
        except FileNotFoundError:  # its writer settled it meanwhile
            continue
        removed += 1
    return removed


class Spool:
    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        min_free_bytes: int = 0,
        node_id: str = "",
        sync_threads: int = SYNC_THREADS,
    ) -> None:
        """``node_id``: the node whose partial files this spool writes (see
        :func:`incoming_folder`). ``sync_threads``: received files fsync'd at once on helper
        threads (the process's association cap: each association has one outstanding at most)."""
        self.root = root
        self.fsync = fsync
        self.sync_threads = max(1, sync_threads)
        self.min_free_bytes = min_free_bytes
        self.node_id = node_id
        self.incoming = incoming_folder(root, node_id)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.quarantine = root / QUARANTINE
        self.quarantine.mkdir(exist_ok=True)
        (root / LOCK_FILE).touch(exist_ok=True)

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
        """Write ``chunks`` durably under the instance's name; never a partial or replaced file.
        When the name is taken by another data set, the bytes are kept under the quarantine
        area instead (``StoredFile.held``)."""
        relpath = self.relpath_for(study_uid, series_uid, sop_instance_uid)
        self._check_free_space()
        fd, tmp_name = temporary_part(self.incoming)
        tmp = Path(tmp_name)
        try:
            size = 0
            digest = DataSetDigest()
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            return self._settle_temp(tmp, relpath, size, digest.hexdigest())
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                raise OutOfResources(f"spool write failed: {os.strerror(exc.errno or 0)}") from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def _settle_temp(self, tmp: Path, relpath: str, size: int, sha256: str) -> StoredFile:
        """Link a written, fsync'd temporary file to ``relpath`` (or, when that name holds
        another data set, into the quarantine area); the caller removes ``tmp``."""
        final = self.root / relpath
        if not final.exists():
            try:
                created = self._link(tmp, final)
            except FileExistsError:
                pass
            else:
                if self.fsync:
                    for directory in (final.parent, *created):
                        sync_directory(directory)
                return StoredFile(relpath, size, duplicate=False, sha256=sha256)
        if file_digest(final) == sha256:
            return StoredFile(relpath, size, duplicate=True, sha256=sha256)
        held, new = self._link_held(tmp, Path(relpath).name[: -len(SUFFIX)], sha256)
        return StoredFile(relpath, size, duplicate=True, sha256=sha256, held=held, held_new=new)

    def _link_held(self, source: Path, sop_instance_uid: str, sha256: str) -> tuple[str, bool]:
        """Hard-link ``source`` to ``.quarantine/<sop>/<sha256>.dcm`` durably; the same bytes
        held twice share one name."""
        held = "/".join(
            (QUARANTINE, require_uid(sop_instance_uid, "SOPInstanceUID"), sha256 + SUFFIX)
        )
        target = self.root / held
        created: list[Path] = []
        new = True
        try:
            created = self._link(source, target)
        except FileExistsError:
            new = False
        if self.fsync:
            for directory in (target.parent, *created):
                sync_directory(directory)
        return held, new

    def hold(self, relpath: str, sop_instance_uid: str) -> StoredFile:
        """Keep a stored file's bytes in the quarantine area too (the caller removes the spool
        name once the catalog says so): for an instance that must join no study."""
        source = self.root / relpath
        sha256 = file_digest(source)
        held, new = self._link_held(source, sop_instance_uid, sha256)
        size = source.stat().st_size
        return StoredFile(held, size, duplicate=False, sha256=sha256, held=held, held_new=new)

    def swap_in(self, held: str, relpath: str) -> None:
        """Replace the file at ``relpath`` by the (fsync'd) held bytes in one rename; the held
        name stays until the caller removes it."""
        fd, tmp_name = temporary_part(self.incoming)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            tmp.unlink()
            os.link(self.root / held, tmp)
            target = self.root / relpath
            created: list[Path] = []
            try:
                os.replace(tmp, target)
            except FileNotFoundError:  # retention removed the folder since the name was taken
                created = self._make_dirs(target.parent)
                os.replace(tmp, target)
            if self.fsync:
                for directory in (target.parent, *created):
                    sync_directory(directory)
        finally:
            tmp.unlink(missing_ok=True)

    def digest(self, relpath: str) -> str:
        return file_digest(self.root / relpath)

    def retention_lock(self, *, shared: bool) -> contextlib.AbstractContextManager[None]:
        return retention_lock(self.root, shared=shared)

    def start_sync(self, temporary: Path) -> FileSync | None:
        """Begin fsyncing ``temporary`` (a whole file in :attr:`incoming`) on a helper thread,
        so the disk works while the caller reads the header and screens the instance; hand the
        result to :meth:`adopt`, which waits for it. The caller must :meth:`FileSync.settle` it
        on every path (a refused file's job is cancelled). Blocks while the pool's slots are
        all taken, so a flood slows its sender. None when the spool does not fsync."""
        if not self.fsync:
            return None
        pool = _syncer(self.sync_threads)
        pool.slots.acquire()
        try:
            return FileSync(temporary, pool)
        except BaseException:
            pool.slots.release()
            raise

    def adopt(
        self,
        temporary: Path,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sha256: str,
        synced: FileSync | None = None,
    ) -> StoredFile:
        """Make ``temporary`` (a whole Part 10 file written in :attr:`incoming`, ``sha256`` the
        digest of its data set) the instance's spool file: fsync'd (here, or by ``synced``
        from :meth:`start_sync`, waited for), then settled like :meth:`store` (linked under its
        name, or kept in quarantine when the name holds other bytes). ``temporary`` is gone
        afterwards, whatever happened."""
        try:
            relpath = self.relpath_for(study_uid, series_uid, sop_instance_uid)
            self._check_free_space()
            size = temporary.stat().st_size
            if self.fsync:
                if synced is not None:
                    synced.result()  # raises the fsync's OSError, if any
                else:
                    _fsync_and_close(os.open(temporary, os.O_RDONLY))
            return self._settle_temp(temporary, relpath, size, sha256)
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                raise OutOfResources(f"spool write failed: {os.strerror(exc.errno or 0)}") from exc
            raise
        finally:
            if synced is not None:
                synced.settle()  # a job not reached (bad name, no space) holds no slot on
            temporary.unlink(missing_ok=True)

    def _link(self, source: Path, target: Path) -> list[Path]:
        """Hard-link ``source`` to ``target``, making its folders; return the folders whose
        entries changed. Retention removes empty folders without the lock this runs outside
        of, so a folder just made may be gone again: made once more and linked again."""
        created = self._make_dirs(target.parent)
        try:
            os.link(source, target)
        except FileNotFoundError:
            if not source.exists():
                raise
            created += self._make_dirs(target.parent)
            os.link(source, target)
        return created

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

    def clean_incoming(self, live: Collection[str] = (), *, older_than_s: float = 0.0) -> int:
        """Delete partial files left by a crash; none of them was ever acknowledged.

        ``live``: the other nodes running on this data path now (their registrations'
        heartbeats are fresh): their folders are left alone. This node's own partial files go
        (it is registered: no other process writes them). Those of other nodes, and those
        directly in ``.incoming`` (tools, older versions), go only when last modified more than
        ``older_than_s`` (the lease time) ago: a node that started a moment ago may not be
        registered yet, and a folder is never removed, as another node may be about to write
        in it."""
        top = self.root / INCOMING
        busy = {incoming_folder(self.root, node).name for node in live}
        cutoff = time.time() - older_than_s
        removed = _remove_parts(top, cutoff)
        for entry in os.scandir(top):
            if not entry.name.startswith(NODE_PREFIX) or entry.name in busy or not entry.is_dir():
                continue
            folder = Path(entry.path)
            removed += _remove_parts(folder, None if folder == self.incoming else cutoff)
        return removed

    def walk(self) -> Iterator[str]:
        """Relative paths of every stored instance."""
        for study in os.scandir(self.root):
            if not study.is_dir() or study.name.startswith("."):
                continue
            for series in os.scandir(study.path):
                if not series.is_dir():
                    continue
                for entry in os.scandir(series.path):
                    if entry.name.endswith(SUFFIX) and entry.is_file():
                        yield f"{study.name}/{series.name}/{entry.name}"
