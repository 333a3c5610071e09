"""What the identity check costs each C-STORE: the screen's three indexed lookups and the
retention check, on a read-only SQLite catalog holding ``--studies`` x ``--instances``.

    python bench/identity.py [--studies 50] [--instances 200] [--calls 2000]

Prints one line per check and writes ``bench/results/identity.json`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pacs_node.catalog.db import open_catalog
from pacs_node.catalog.models import utcnow
from pacs_node.catalog.studies import record_instances
from pacs_node.ingest.identity import IdentityGate
from pacs_node.ingest.spool import Spool
from pacs_node.refs import CommitmentReport, InstanceHeader, InstanceRef

ROOT = Path(__file__).resolve().parents[1]
CT = "1.2.840.10008.5.1.4.1.1.2"


class _NoSink:
    def submit(self, ref: InstanceRef) -> None: ...

    def count(self, name: str, by: int = 1) -> None: ...

    def duplicate(self, study_uid: str) -> None: ...

    def commitment_report(self, report: CommitmentReport) -> None: ...


def _header(study: int, sop: int) -> InstanceHeader:
    return InstanceHeader(
        f"1.2.{study}", f"1.2.{study}.1", f"1.2.{study}.1.{sop}", CT, patient_id=f"P{study}"
    )


def _per_call_ms(calls: int, check: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for i in range(calls):
        check(i)
    return (time.perf_counter() - start) / calls * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "identity.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{Path(scratch) / 'catalog.sqlite'}"
        catalog = open_catalog(url)
        with catalog.sessions.begin() as session:
            for study in range(args.studies):
                refs = [
                    InstanceRef(_header(study, sop), "1.2.840.10008.1.2.1", "x", 1, utcnow())
                    for sop in range(args.instances)
                ]
                record_instances(session, refs)
        catalog.dispose()
        read_only = open_catalog(url, run_migrations=False, read_only=True)
        gate = IdentityGate(Spool(Path(scratch) / "spool"), _NoSink(), read_only)
        n = args.studies
        result = {
            "catalog_instances": args.studies * args.instances,
            "calls": args.calls,
            "screen_ms": _per_call_ms(
                args.calls, lambda i: gate.screen(_header(i % n, args.instances + i))
            ),
            "removal_check_ms": _per_call_ms(
                args.calls,
                lambda i: gate.being_removed(f"1.2.{i % n}"),
            ),
        }
        read_only.dispose()
    for key in ("screen_ms", "removal_check_ms"):
        print(f"{key}: {result[key]:.3f} ms per C-STORE ({result['catalog_instances']} held)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
