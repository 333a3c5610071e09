"""Usable cores from affinity and cgroup quotas (fake cgroup trees), and each job worker's
share of them as torch threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pacs_node import cpus
from pacs_node.cpus import cgroup_cpu_limit, inference_threads, limit_threads, usable_cores


def _tree(tmp_path: Path, proc_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_cgroup)
    return root, proc


@pytest.mark.parametrize(
    ("proc_cgroup", "files", "expected"),
    [
        # cgroup v2 in a container: the namespace shows the own group as the root
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        # v2 on a host: the process's group, and a tighter limit on its parent slice
        (
            "0::/system.slice/pacs-node.service\n",
            {
                "cpu.max": "max 100000\n",
                "system.slice/cpu.max": "100000 100000\n",
                "system.slice/pacs-node.service/cpu.max": "300000 100000\n",
            },
            1.0,
        ),
        # cgroup v1: quota and period in two files; -1 is no quota
        (
            "4:cpu,cpuacct:/docker/abc\n0::/\n",
            {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"},
            0.5,
        ),
        (
            "4:cpu,cpuacct:/\n",
            {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
            None,
        ),
        # nothing readable, or nonsense: no limit, never an exception
        ("", {}, None),
        ("0::/\n", {"cpu.max": "lots 0\n"}, None),
        ("0::/\n", {"cpu.max": "0 100000\n"}, None),
    ],
)
def test_the_cgroup_quota_is_read_from_v1_and_v2_files(
    tmp_path: Path, proc_cgroup: str, files: dict[str, str], expected: float | None
) -> None:
    root, proc = _tree(tmp_path, proc_cgroup, files)
    assert cgroup_cpu_limit(root, proc) == expected


def test_usable_cores_are_the_affinity_cut_by_the_quota_rounded_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5, 6, 7})
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "250000 100000\n"})
    assert usable_cores(root, proc) == 3  # 2.5 CPUs of quota keep 3 threads busy part-time
    (root / "cpu.max").write_text("max 100000\n")
    assert usable_cores(root, proc) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {3})
    assert usable_cores(root, proc) == 1  # taskset -c 3
    (root / "cpu.max").write_text("10000 100000\n")
    assert usable_cores(root, proc) == 1  # a tenth of a CPU is still one thread


@pytest.mark.parametrize(
    ("torch_threads", "workers", "cores", "expected"),
    [
        (0, 1, 2, 2),  # one worker: every core
        (0, 2, 2, 1),  # two workers on two cores: one thread each, never four
        (0, 3, 2, 1),  # more workers than cores: at least one
        (0, 2, 16, 8),
        (0, 0, 4, 4),  # no pool (the CLI): the process runs alone
        (3, 2, 2, 3),  # set explicitly: taken as it is
    ],
)
def test_each_worker_gets_its_share_of_the_cores(
    torch_threads: int, workers: int, cores: int, expected: int
) -> None:
    assert inference_threads(torch_threads, workers, cores) == expected


def test_auto_threads_follow_this_process_s_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "usable_cores", lambda: 6)
    assert inference_threads(0, 2) == 3


def test_thread_variables_are_set_for_libraries_loaded_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in cpus.THREAD_ENV:
        monkeypatch.setenv(name, "64")
    limit_threads(2)
    assert {name: os.environ[name] for name in cpus.THREAD_ENV} == dict.fromkeys(
        cpus.THREAD_ENV, "2"
    )


def _meminfo(tmp_path: Path, available_kib: int | None) -> Path:
    path = tmp_path / "meminfo"
    lines = ["MemTotal:       16000000 kB"]
    if available_kib is not None:
        lines.append(f"MemAvailable:   {available_kib} kB")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("configured", "cores", "available_gib", "expected"),
    [
        (None, 8, 64.0, 2),  # auto: at most two
        (None, 1, 64.0, 1),  # one core
        (None, 2, 64.0, 1),  # two cores: one worker with both
        (None, 3, 64.0, 1),
        (None, 4, 2.0, 1),  # 2 GiB free: room for one 1.5 GiB worker
        (None, 4, 0.5, 1),  # too little for one: still one, never none
        (None, 4, 3.0, 2),
        (None, 4, None, 2),  # no MemAvailable: cores decide
        (5, 1, 0.5, 5),  # an explicit number is kept
        (0, 8, 64.0, 0),
    ],
)
def test_auto_job_workers_fit_the_cores_and_the_memory(
    tmp_path: Path, configured: int | None, cores: int, available_gib: float | None, expected: int
) -> None:
    kib = None if available_gib is None else int(available_gib * 2**20)
    count, reason = cpus.job_workers(configured, cores=cores, meminfo=_meminfo(tmp_path, kib))
    assert count == expected
    assert reason.startswith("auto: min(2, " if configured is None else "configured")
    if configured is None:
        assert f"{cores} usable cores" in reason


def test_job_workers_are_auto_unless_a_number_is_set() -> None:
    from pacs_node.config import NodeOptions

    assert NodeOptions().job_workers is None
    assert NodeOptions(job_workers="auto").job_workers is None  # type: ignore[arg-type]
    assert NodeOptions(job_workers=3).job_workers == 3


def test_more_workers_than_cores_are_warned_of() -> None:
    assert cpus.too_many_workers(2, cores=2) is None
    warning = cpus.too_many_workers(3, cores=2)
    assert warning is not None
    assert "3 job workers on 2 usable cores" in warning


def test_the_celery_worker_command_limits_threads_before_numpy_loads(tmp_path: Path) -> None:
    """OpenBLAS and MKL size their pools when numpy loads: the worker command and the worker
    module load no numpy, and the thread variables are set before the worker starts (its
    runner, made on the first task, is what loads numpy and torch)."""
    script = tmp_path / "probe.py"
    script.write_text(
        """
import os, sys

from pacs_node.cli.app import app
import pacs_node.jobs.celery_worker as celery_worker

assert "numpy" not in sys.modules, "the worker's modules load numpy before its thread limits"

def start_worker(settings, queues, concurrency):
    print("start", os.environ.get("OPENBLAS_NUM_THREADS", "unset"), "numpy" in sys.modules)
    return 0

celery_worker.start_worker = start_worker
try:
    app(
        ["worker", "--concurrency", "2", "--database-url", "sqlite:///%s",
         "--broker-url", "redis://127.0.0.1:1/0"],
        standalone_mode=False,
    )
except SystemExit:
    pass
"""
        % (tmp_path / "c.sqlite")
    )
    import subprocess
    import sys

    from pacs_node.catalog.db import open_catalog

    open_catalog(f"sqlite:///{tmp_path / 'c.sqlite'}").dispose()  # migrated: the worker starts

    env = {k: v for k, v in os.environ.items() if k not in cpus.THREAD_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    env["PACS_NODE_DATA_DIR"] = str(tmp_path / "var")
    done = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"start {inference_threads(0, 2)} False" in done.stdout
