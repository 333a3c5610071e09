"""The spool: atomic writes, UID-only paths, first copy wins, out-of-resources on a full disk."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacs_node.errors import InvalidUID, MissingAttribute, OutOfResources
from pacs_node.ingest import spool as spool_module
from pacs_node.ingest.spool import INCOMING, Spool
from pacs_node.uids import is_valid_uid, require_uid

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def test_store_writes_whole_file_under_uid_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stored = spool.store(STUDY, SERIES, SOP, [b"abc", memoryview(b"def")])
    assert stored.relpath == f"{STUDY}/{SERIES}/{SOP}.dcm"
    assert not stored.duplicate
    assert (tmp_path / "spool" / stored.relpath).read_bytes() == b"abcdef"
    assert stored.size_bytes == 6
    assert list(spool.incoming.iterdir()) == []
    assert list(spool.walk()) == [stored.relpath]


def test_first_copy_is_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(STUDY, SERIES, SOP, [b"first"])
    again = spool.store(STUDY, SERIES, SOP, [b"second"])
    assert again.duplicate
    assert (tmp_path / again.relpath).read_bytes() == b"first"


@pytest.mark.parametrize(
    "uid", ["1.2.3/../../x", "../1.2", "1.2.3\\x", "1..2", ".1.2", "1.2.", "1.2.a", "1" * 65]
)
def test_hostile_uids_never_become_paths(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUID):
        spool.store(uid, SERIES, SOP, [b"x"])
    with pytest.raises(InvalidUID):
        spool.store(STUDY, SERIES, uid, [b"x"])
    assert list(spool.walk()) == []
    assert list(spool.incoming.iterdir()) == []


@given(st.text(max_size=80))
def test_only_digits_and_dots_pass(text: str) -> None:
    if is_valid_uid(text):
        assert set(text) <= set("0123456789.")
        assert ".." not in text
        assert not text.startswith(".")
        assert not text.endswith(".")
        assert len(text) <= 64


def test_strict_uid_rules() -> None:
    assert is_valid_uid("1.2.840.10008.1.2", strict=True)
    assert is_valid_uid("1.2.0.3", strict=True)
    assert not is_valid_uid("1.2.03", strict=True)
    assert is_valid_uid("1.2.03")  # seen from real devices; still path-safe


def test_require_uid_errors() -> None:
    with pytest.raises(MissingAttribute):
        require_uid(None, "StudyInstanceUID")
    with pytest.raises(MissingAttribute):
        require_uid("  ", "StudyInstanceUID")
    assert require_uid("1.2.3\0", "X") == "1.2.3"


def _disk_fills_up() -> Iterator[bytes]:
    yield b"partial"
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_out_of_resources_and_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(OutOfResources):
        spool.store(STUDY, SERIES, SOP, _disk_fills_up())
    assert list(spool.walk()) == []
    assert list(spool.incoming.iterdir()) == []


def test_free_space_floor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=2**62)
    with pytest.raises(OutOfResources, match="free"):
        spool.store(STUDY, SERIES, SOP, [b"x"])
    assert list(spool.walk()) == []


def test_clean_incoming_removes_unacknowledged_partials(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (spool.incoming / "abc.part").write_bytes(b"half")
    assert spool.clean_incoming() == 1
    assert list(spool.incoming.iterdir()) == []


def test_a_replacement_goes_in_after_retention_removed_the_folders(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.store(STUDY, SERIES, SOP, [b"first"])
    again = spool.store(STUDY, SERIES, SOP, [b"second"])
    assert again.held is not None
    (tmp_path / first.relpath).unlink()  # retention step 2: file, then the empty folders
    (tmp_path / STUDY / SERIES).rmdir()
    (tmp_path / STUDY).rmdir()
    spool.swap_in(again.held, first.relpath)
    assert (tmp_path / first.relpath).read_bytes() == b"second"


def test_a_folder_removed_between_making_it_and_linking_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    make_dirs = spool._make_dirs
    calls: list[Path] = []

    def racing_retention(directory: Path) -> list[Path]:
        created = make_dirs(directory)
        calls.append(directory)
        if len(calls) == 1:  # retention's rmdir of the (still empty) folder wins the race
            directory.rmdir()
        return created

    monkeypatch.setattr(spool, "_make_dirs", racing_retention)
    stored = spool.store(STUDY, SERIES, SOP, [b"data"])
    assert (tmp_path / stored.relpath).read_bytes() == b"data"
    assert len(calls) == 2


def _timed_fsyncs(
    monkeypatch: pytest.MonkeyPatch, fail_first: bool = False
) -> list[tuple[float, float]]:
    """Replace the directory fsync by a slow one that records (start, end) of each call."""
    calls: list[tuple[float, float]] = []
    lock = threading.Lock()

    def slow(path: Path) -> None:
        start = time.monotonic()
        time.sleep(0.02)
        with lock:
            first = not calls
            calls.append((start, time.monotonic()))
        if fail_first and first:
            raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spool_module, "_fsync_dir", slow)
    return calls


def test_threads_on_one_directory_share_fsyncs_that_started_after_their_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _timed_fsyncs(monkeypatch)
    asked: list[tuple[float, float]] = []  # (asked at, returned at) per caller
    lock = threading.Lock()

    def link_then_sync() -> None:
        for _ in range(5):
            at = time.monotonic()
            spool_module.sync_directory(tmp_path)
            with lock:
                asked.append((at, time.monotonic()))

    threads = [threading.Thread(target=link_then_sync) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(asked) == 40
    assert len(calls) < 40  # grouped
    for at, returned in asked:  # each was covered by an fsync that began after it asked
        assert any(at <= start and end <= returned for start, end in calls)
    assert not spool_module._groups


def test_every_waiter_a_failed_directory_fsync_covered_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first fsync holds until three more callers asked; the next one covers those three
    and fails: all three raise its error (a later fsync on a new descriptor might not see the
    write-back error again). A request made after the failure is synced afresh."""
    calls: list[str] = []

    def fsync(path: Path) -> None:
        calls.append("fsync")
        if len(calls) == 1:
            deadline = time.monotonic() + 10
            group = spool_module._groups[os.fspath(path)]
            while group.requested < 4 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert group.requested == 4
        elif len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spool_module, "_fsync_dir", fsync)
    outcomes: list[str] = []
    errors: list[int | None] = []

    def link_then_sync() -> None:
        try:
            spool_module.sync_directory(tmp_path)
        except OSError as exc:
            outcomes.append("failed")
            errors.append(exc.errno)
        else:
            outcomes.append("synced")

    first = threading.Thread(target=link_then_sync)
    first.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:  # the first fsync is running
        time.sleep(0.001)
    threads = [threading.Thread(target=link_then_sync) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in [first, *threads]:
        thread.join(30)
    assert outcomes[0] == "synced"
    assert sorted(outcomes) == ["failed", "failed", "failed", "synced"]
    assert errors == [errno.EIO] * 3
    assert calls == ["fsync", "fsync"]  # nobody re-ran a fresh fsync for a failed entry
    spool_module.sync_directory(tmp_path)  # asked after the failure: a new fsync covers it
    assert len(calls) == 3
    assert not spool_module._groups


def test_a_failed_directory_fsync_releases_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callers racing a failing fsync: each one it covered fails, the others are synced by a
    later fsync; none is released without a successful fsync that began after it asked."""
    calls = _timed_fsyncs(monkeypatch, fail_first=True)
    outcomes: list[tuple[str, float, float]] = []

    def link_then_sync() -> None:
        at = time.monotonic()
        try:
            spool_module.sync_directory(tmp_path)
        except OSError:
            outcomes.append(("failed", at, time.monotonic()))
        else:
            outcomes.append(("synced", at, time.monotonic()))

    threads = [threading.Thread(target=link_then_sync) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == 4
    assert "failed" in [outcome for outcome, _, _ in outcomes]
    for outcome, at, returned in outcomes:
        if outcome == "synced":  # by a successful fsync (not the first) begun after it asked
            assert any(at <= start and end <= returned for start, end in calls[1:])


@pytest.fixture
def sync_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh process pool for the received files' fsyncs, shut down afterwards."""
    monkeypatch.setattr(spool_module, "_pool", None)
    yield
    pool = spool_module._pool
    if pool is not None:
        pool.executor.shutdown(wait=True)


def _open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.usefixtures("sync_pool")
def test_a_queued_fsync_holds_no_descriptor_and_a_settled_one_is_never_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the one thread busy, a job waits in the queue without an open file; settling it
    (its file refused) cancels it, so the file is never fsync'd."""
    spool = Spool(tmp_path, sync_threads=1)
    release = threading.Event()
    synced: list[str] = []
    real_fsync = os.fsync

    def blocking_fsync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", blocking_fsync)
    busy = spool.start_sync(_named(spool, "busy.part"))
    assert busy is not None
    deadline = time.monotonic() + 10
    while not synced and time.monotonic() < deadline:
        time.sleep(0.001)
    before = _open_descriptors()
    refused = spool.start_sync(_named(spool, "refused.part"))
    assert refused is not None
    assert _open_descriptors() == before
    refused.settle()  # returns at once: cancelled, not waited for
    release.set()
    busy.result(10)
    assert synced == ["busy.part"]


@pytest.mark.usefixtures("sync_pool")
def test_outstanding_fsyncs_are_bounded_so_a_flood_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, sync_threads=1)
    release = threading.Event()
    real_fsync = os.fsync

    def blocking_fsync(fd: int) -> None:
        assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", blocking_fsync)
    pool = spool_module._syncer(1)
    slots = [spool.start_sync(_named(spool, f"{n}.part")) for n in range(pool.capacity)]
    started: list[object] = []
    flood = threading.Thread(target=lambda: started.append(spool.start_sync(_named(spool, "x"))))
    flood.start()
    flood.join(0.2)
    assert flood.is_alive()
    assert not started
    release.set()
    flood.join(10)
    assert len(started) == 1
    for job in [*slots, *started]:
        assert job is not None
        job.result(10)


def test_the_pool_is_made_once_under_a_lock_and_sized_by_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spool_module, "_pool", None)
    pools: list[object] = []
    barrier = threading.Barrier(8)

    def get() -> None:
        barrier.wait()
        pools.append(spool_module._syncer(40))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    made = spool_module._syncer(40)
    try:
        assert all(pool is made for pool in pools)
        assert made.threads == 40  # the association cap, not a fixed 16
        assert spool_module._syncer(8) is made  # a smaller cap keeps the larger pool
    finally:
        made.executor.shutdown(wait=True)


def _incoming(spool: Spool, data: bytes) -> Path:
    path = spool.incoming / "x.part"
    path.write_bytes(data)
    return path


def _named(spool: Spool, name: str) -> Path:
    path = spool.incoming / name
    path.write_bytes(b"data")
    return path


def test_an_early_fsync_is_waited_for_before_the_name_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    order: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def slow_fsync(fd: int) -> None:
        time.sleep(0.05)
        real_fsync(fd)
        order.append("fsync")

    def link(source: Path, target: Path) -> None:
        order.append("link")
        real_link(source, target)

    monkeypatch.setattr(spool_module.os, "fsync", slow_fsync)
    monkeypatch.setattr(spool_module.os, "link", link)
    temporary = _incoming(spool, b"data")
    synced = spool.start_sync(temporary)
    assert synced is not None
    stored = spool.adopt(temporary, "1.2", "1.2.3", "1.2.3.4", "digest", synced)
    assert order[:2] == ["fsync", "link"]
    assert (tmp_path / stored.relpath).read_bytes() == b"data"
    assert not temporary.exists()


def test_a_failed_early_fsync_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(spool_module.os, "fsync", failing)
    temporary = _incoming(spool, b"data")
    synced = spool.start_sync(temporary)
    with pytest.raises(OutOfResources):
        spool.adopt(temporary, "1.2", "1.2.3", "1.2.3.4", "digest", synced)
    assert not (tmp_path / "1.2").exists()
    assert not temporary.exists()


def test_no_early_fsync_without_fsync(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    assert spool.start_sync(_incoming(spool, b"data")) is None


def test_the_incoming_folder_name_is_one_a_smb_share_accepts(tmp_path: Path) -> None:
    """The default node_id is ``<host>:<digest>``: SMB and Azure Files refuse ``:``."""
    spool = Spool(tmp_path, node_id="Scanner-Host:0a1B2c")
    assert spool.incoming.name == "node.scanner-host-0a1b2c"
    beside = Spool(tmp_path, node_id="other:1")
    (spool.incoming / "writing.part").write_bytes(b"partial")
    assert beside.clean_incoming(live={"Scanner-Host:0a1B2c"}) == 0  # a live node's folder
    assert (spool.incoming / "writing.part").exists()


def test_partial_files_of_tools_go_only_once_older_than_the_lease_time(tmp_path: Path) -> None:
    spool = Spool(tmp_path, node_id="node-a")
    top = tmp_path / INCOMING
    fresh, old = top / "fresh.part", top / "old.part"
    fresh.write_bytes(b"a tool writes it now")
    old.write_bytes(b"left by a crashed tool")
    long_ago = time.time() - 120
    os.utime(old, (long_ago, long_ago))
    assert spool.clean_incoming(older_than_s=60) == 1
    assert fresh.exists()
    assert not old.exists()
