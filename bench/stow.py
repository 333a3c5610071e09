"""STOW-RS benchmark: how fast pacs-node takes the same CT slices over STOW-RS and over C-STORE.

What it does
------------
1. Writes N synthetic 512x512 16-bit CT slices (``ingest.generate_series``) once.
2. Per run and transport it starts a fresh ``pacs-node serve`` as shipped (fsync before the
   answer, SQLite catalog, web face on a free port) and measures the wall time from the first
   byte sent to the moment its catalog holds all N instances:

   - ``STOW-RS``: one HTTP connection (httpx), ``--batch`` files per request, each request's body
     built from the files just before it is sent; a bearer token of an operator made through the
     service layer before the clock starts;
   - ``C-STORE``: dcmtk ``storescu``, one association (``TCP_NODELAY=1``).

3. Prints instances/s and MB/s (10^6 bytes of DICOM files), the median over ``--runs`` (runs
   interleave the transports), and writes them to ``--out``.

Usage: ``python bench/stow.py [--n 100] [--runs 1] [--batch 16] [--out FILE.json]``
(default output: ``bench/results/stow.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
from common import dicom_env, free_port, wait_until, work_dir
from ingest import STORESCU, PacsNode, generate_series

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TIMEOUT_S = 300.0


class WebPacsNode(PacsNode):
    """The shipped node with its web face on a port chosen once."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.web_port = free_port()
        self.clock = 0.0  # when the first byte was sent

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PACS_NODE_WEB_PORT"] = str(self.web_port)
        return env

    def operator_token(self) -> str:
        from pacs_node.actor import Actor
        from pacs_node.catalog.db import open_catalog
        from pacs_node.catalog.models import Role
        from pacs_node.services import accounts

        catalog = open_catalog(f"sqlite:///{self.data_dir / 'catalog.sqlite'}")
        try:
            actor = Actor.user("bench")
            accounts.create_user(catalog, "bench", Role.OPERATOR, "bench-password-1234", actor)
            return accounts.create_token(catalog, "bench", "bench", actor)
        finally:
            catalog.dispose()


def multipart(paths: Sequence[Path], boundary: str) -> bytes:
    body = bytearray()
    for path in paths:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += path.read_bytes()
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body)


def stow(node: WebPacsNode, files: list[Path], batch: int) -> None:
    token = node.operator_token()
    boundary = "pacs-node-bench-0123456789abcdef"
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    url = f"http://127.0.0.1:{node.web_port}/dicomweb/studies"
    with httpx.Client(timeout=TIMEOUT_S) as client:
        node.clock = time.perf_counter()
        for start in range(0, len(files), batch):
            answer = client.post(
                url, content=multipart(files[start : start + batch], boundary), headers=headers
            )
            if answer.status_code != 200:
                raise RuntimeError(f"STOW-RS answered {answer.status_code}: {answer.text[:300]}")


def c_store(node: WebPacsNode, files: list[Path], batch: int) -> None:
    node.clock = time.perf_counter()
    argv = [STORESCU, "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, files)]
    subprocess.run(argv, env=dicom_env(), check=True, capture_output=True, timeout=TIMEOUT_S)


TRANSPORTS = {"STOW-RS": stow, "C-STORE": c_store}


def measure(transport: str, files: list[Path], batch: int, folder: Path) -> float:
    node = WebPacsNode(folder)
    node.start()
    try:
        TRANSPORTS[transport](node, files, batch)
        wait_until(lambda: node.count() >= len(files), TIMEOUT_S, "all instances", 0.02)
        return time.perf_counter() - node.clock
    finally:
        node.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="files per STOW-RS request")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stow.json")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    seconds: dict[str, list[float]] = {name: [] for name in TRANSPORTS}
    with work_dir(args.work_dir, "pacs-node-stow-bench-") as base:
        files = generate_series(base / "series", args.n)
        size = sum(path.stat().st_size for path in files)
        for run in range(args.runs):
            for name in TRANSPORTS:
                took = measure(name, files, args.batch, base / f"{name}-{run}")
                seconds[name].append(took)
                print(f"run {run + 1} {name}: {took:.2f} s", file=sys.stderr)
    rows = []
    for name, values in seconds.items():
        median = statistics.median(values)
        rows.append(
            {
                "transport": name,
                "seconds": round(median, 3),
                "per_s": round(args.n / median, 1),
                "mb_per_s": round(size / median / 1e6, 1),
            }
        )
    table = "| transport | s | instances/s | MB/s |\n| --- | --- | --- | --- |\n" + "\n".join(
        f"| {r['transport']} | {r['seconds']:.2f} | {r['per_s']:.1f} | {r['mb_per_s']:.1f} |"
        for r in rows
    )
    print(table)
    report = {
        "benchmark": "stow",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/stow.py", *(argv or sys.argv[1:])]),
        "n": args.n,
        "runs": args.runs,
        "batch": args.batch,
        "bytes_per_run": size,
        "summary": rows,
        "seconds": seconds,
        "table_markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
