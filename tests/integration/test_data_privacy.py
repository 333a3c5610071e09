"""Through ``pacs-node serve`` and a real association: everything under the data folder is
the node user's alone (folders 0700, files 0600), even a folder an older version left open."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import NodeProcess, storescu, wait_for
from tests.dicom_factory import write_series

pytestmark = pytest.mark.integration


def test_everything_under_the_data_folder_is_private(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = make_node(start=False, dicom_workers=1)
    node.data_dir.mkdir(parents=True, mode=0o755)
    node.data_dir.chmod(0o755)
    node.start()
    files = write_series(tmp_path / "ct", slices=2)
    assert storescu(node, *files).returncode == 0
    wait_for(lambda: [s["instances"] for s in node.studies()] == [2], 20, what="catalogued")

    modes = {
        path.relative_to(node.data_dir).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in [node.data_dir, *node.data_dir.rglob("*")]
    }
    assert modes["."] == 0o700
    for name in ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"):
        assert modes[name] == 0o600, name
    spooled = [name for name in modes if name.endswith(".dcm")]
    assert len(spooled) == 2
    opened = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
    assert opened == {}  # nothing readable, writable or searchable by group or others
