"""Which process a node registration was made by, told apart across hosts and containers.

Containers on one host often share a host name and run the node as pid 1, each in its own pid
namespace: a host name and a pid alone cannot tell a live process of another container from a
dead earlier one of this container. A registration therefore records the kernel's boot id, the
pid namespace and the process's start time (clock ticks after boot, ``/proc/<pid>/stat``
field 22). A row is an earlier life of this node, taken over without waiting out the lease,
only when it was made in this boot and this pid namespace and its process is gone (its pid is
free, or reused by a process started at another time). Where ``/proc`` is missing (not Linux)
nothing is known (empty boot id, zeros) and a row is only ever taken over once stale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    boot_id: str  # "" when unknown
    pid_ns: int  # inode of the pid namespace; 0 when unknown
    pid: int
    start: int  # clock ticks after boot; 0 when unknown

    @property
    def known(self) -> bool:
        return bool(self.boot_id) and self.pid_ns > 0 and self.start > 0


def process_start(pid: int, proc: Path = PROC) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot); None when there is no such
    process, 0 when it cannot be read."""
    try:
        stat = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None if proc.is_dir() else 0
    except OSError:
        return 0
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; field 22 is starttime
    fields = stat[stat.rfind(")") + 1 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def current(proc: Path = PROC) -> ProcessIdentity:
    """This process's identity (what can be read of it)."""
    pid = os.getpid()
    try:
        boot_id = (proc / "sys/kernel/random/boot_id").read_text(encoding="ascii").strip()[:64]
    except OSError:
        boot_id = ""
    try:
        pid_ns = os.stat(proc / "self/ns/pid").st_ino
    except OSError:
        pid_ns = 0
    return ProcessIdentity(boot_id, pid_ns, pid, process_start(pid, proc) or 0)


def earlier_life(row: ProcessIdentity, mine: ProcessIdentity, proc: Path = PROC) -> bool:
    """Whether the process ``row`` names ran in this boot and this pid namespace and is gone
    (never when anything is unknown, nor when it is ``mine``)."""
    if not (row.known and mine.known) or (row.boot_id, row.pid_ns) != (mine.boot_id, mine.pid_ns):
        return False
    if (row.pid, row.start) == (mine.pid, mine.start):
        return False  # this very process
    started = process_start(row.pid, proc)
    if started == 0:
        return False  # unreadable: assume it runs
    return started is None or started != row.start
