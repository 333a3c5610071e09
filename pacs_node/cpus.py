"""How many CPU cores this process may use, and how many threads each job worker gets.

A job spends most of its time in single-threaded Python (decoding the series, building the
results) and only part of it in torch's thread pool, so two worker processes with one torch
thread each keep two cores busier than one worker with two threads. But torch's default pool
is one thread per core in *every* process: two workers would run four busy threads on two
cores and each would slow the other. ``torch_threads: 0`` therefore means the share of one
worker: ``max(1, usable cores // job workers)``.

Usable cores are the fewer of the CPUs this process may be scheduled on (affinity: taskset,
cpusets) and the cgroup CPU quota (a container's ``--cpus``, Kubernetes' CPU limit; cgroup v2
``cpu.max``, v1 ``cpu.cfs_quota_us``), rounded up as the Go and Java runtimes do.
``os.cpu_count()`` counts the host's cores and sees neither.

The limits must be in place before the math libraries start their pools: a spawned worker
calls :func:`limit_threads` before it imports torch or numpy, which reads the
``OMP_NUM_THREADS`` family of variables once, at load.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")
MAX_AUTO_WORKERS = 2  # a job is mostly one core's Python: two keep the model busy
WORKER_BYTES = 3 * 2**29  # 1.5 GiB: one worker's models and one job's arrays, with headroom
PROC_CGROUP = Path("/proc/self/cgroup")
# Read once by OpenMP (torch, scikit-image), MKL, OpenBLAS (numpy) and numexpr at load.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _quota(text: str | None, period_text: str | None = None) -> float | None:
    """CPUs allowed by one quota file: v2 ``"max 100000"`` / ``"150000 100000"``, or v1's
    quota (``-1``: none) with its period file. ``None`` when absent, unlimited or unreadable."""
    if not text:
        return None
    fields = text.split()
    if period_text is not None:
        fields = [fields[0], period_text.strip()]
    if len(fields) != 2 or fields[0] in ("max", "-1"):
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _cgroup_dirs(proc_cgroup: Path) -> tuple[list[str], list[str]]:
    """This process's cgroup paths from ``/proc/self/cgroup``: the v2 one (``0::/path``) and
    the v1 ones of the ``cpu`` controller (``N:cpu,cpuacct:/path``)."""
    v2: list[str] = []
    v1: list[str] = []
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2.append(path)
        elif "cpu" in controllers.split(","):
            v1.append(path)
    return v2, v1


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota over this process's cgroup and its parents (``None``: none).

    Inside a container the cgroup namespace shows the process's own group as the root, so
    ``root/cpu.max`` is tried first; on a host the path from ``/proc/self/cgroup`` and each
    parent up to the root are read (a limit may be set on a parent slice)."""
    v2, v1 = _cgroup_dirs(proc_cgroup)
    limits: list[float] = []
    for path in v2:
        here = root / path.lstrip("/")
        for folder in (here, *here.parents):
            if folder == root or root in folder.parents:
                limits += filter(None, [_quota(_read(folder / "cpu.max"))])
    limits += filter(None, [_quota(_read(root / "cpu.max"))])
    for path in v1:
        for base in (root / "cpu", root / "cpu,cpuacct"):
            here = base / path.lstrip("/")
            # the group's own quota and each parent's up to the controller's mount, as for v2
            for folder in {here, *(p for p in here.parents if p == base or base in p.parents)}:
                quota = _read(folder / "cpu.cfs_quota_us")
                period = _read(folder / "cpu.cfs_period_us")
                if quota is not None and period is not None:
                    limits += filter(None, [_quota(quota, period)])
    return min(limits) if limits else None


def usable_cores(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Cores this process may keep busy: affinity, then the cgroup quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def inference_threads(torch_threads: int, workers: int, cores: int | None = None) -> int:
    """Torch threads for one of ``workers`` processes: ``torch_threads`` when set (> 0), else
    an even share of the usable cores, at least one."""
    if torch_threads > 0:
        return torch_threads
    available = usable_cores() if cores is None else cores
    return max(1, available // max(1, workers))


def limit_threads(threads: int) -> None:
    """Size the OpenMP and BLAS pools of libraries not loaded yet in this process, and of its
    children, to ``threads``: they read these variables once, at load. Torch's own pools,
    once it is loaded, are sized by :class:`~pacs_node.inference.runner.Runner`."""
    for name in THREAD_ENV:
        os.environ[name] = str(threads)


def available_memory(meminfo: Path = MEMINFO) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where it cannot be read."""
    for line in (_read(meminfo) or "").splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            fields = value.split()
            try:
                return int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
            except (IndexError, ValueError):
                return None
    return None


def job_workers(
    configured: int | None, cores: int | None = None, meminfo: Path = MEMINFO
) -> tuple[int, str]:
    """Job worker processes to run, and why: ``configured`` when set (an integer, 0
    included); else (``auto``) ``min(2, usable cores // 2, MemAvailable // 1.5 GiB)``, at
    least one: each worker has two cores for its model, so a lone study is not slowed down
    (measured: on two cores, two one-thread workers ran no more studies per hour than one
    two-thread worker, and each study took longer), and a small box never runs more workers
    than it has cores or memory for."""
    if configured is not None:
        return configured, "configured"
    available = usable_cores() if cores is None else cores
    memory = available_memory(meminfo)
    by_memory = MAX_AUTO_WORKERS if memory is None else memory // WORKER_BYTES
    count = max(1, min(MAX_AUTO_WORKERS, available // 2, by_memory))
    room = "unknown" if memory is None else f"{memory / 2**30:.1f} GiB"
    reason = (
        f"auto: min({MAX_AUTO_WORKERS}, {available} usable cores // 2, "
        f"{room} available / 1.5 GiB), at least 1"
    )
    return count, reason


def too_many_workers(workers: int, cores: int | None = None) -> str | None:
    """A warning when ``workers`` processes are more than the usable cores (they would slow
    one another down, each getting one torch thread on a shared core); None when they fit."""
    available = usable_cores() if cores is None else cores
    if workers <= available:
        return None
    return (
        f"{workers} job workers on {available} usable cores: they share cores and slow one "
        "another; set job_workers (or --concurrency) to at most the cores"
    )
