"""The audit trail end to end: a node with a syslog collector (TLS) that is down at first; a
scanner's study and a refused peer are audited in the catalog, reach the collector once it comes
up, each a valid PS3.15 AuditMessage; ``pacs-node audit --json`` lists them."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import create_engine, text

from pacs_node.audit.message import validate
from tests.conftest import NodeProcess, free_port, storescu, wait_for
from tests.dicom_factory import write_study
from tests.syslog_collector import SyslogCollector, make_pki, payload

pytestmark = pytest.mark.integration

ECHOSCU = "/usr/bin/echoscu"


def _event_ids(messages: list[bytes]) -> list[tuple[str, str | None, str | None]]:
    """(EventID, first EventTypeCode, outcome) of each syslog message, in order."""
    found = []
    for message in messages:
        xml = payload(message)
        validate(xml)
        ident = etree.fromstring(xml).find("EventIdentification")
        assert ident is not None
        event_id = ident.find("EventID")
        type_code = ident.find("EventTypeCode")
        found.append(
            (
                event_id.get("csd-code", "") if event_id is not None else "",
                type_code.get("csd-code") if type_code is not None else None,
                ident.get("EventOutcomeIndicator"),
            )
        )
    return found


def test_audit_events_are_stored_listed_and_forwarded_when_the_collector_returns(
    make_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    node = make_node(
        quiet_period_s=1.0,
        job_workers=0,
        audit_syslog_host="127.0.0.1",
        audit_syslog_port=port,
        audit_syslog_ca_file=str(pki.ca_file),
    )
    engine = create_engine(f"sqlite:///{node.data_dir / 'catalog.sqlite'}")

    def rows() -> list[tuple[int, str, str | None, int, str, str | None]]:
        with engine.connect() as connection:
            return [
                (int(r[0]), str(r[1]), r[2], int(r[3]), str(r[4]), r[5])
                for r in connection.execute(
                    text(
                        "SELECT id, event_id, event_type, outcome, actor, forwarded_at "
                        "FROM audit_events ORDER BY id"
                    )
                )
            ]

    collector = SyslogCollector(pki, port)
    try:
        # While the collector is away: a study from a known scanner, a refused peer.
        study_uid = write_study(tmp_path / "study", [("CT", 3)])
        sent = storescu(node, tmp_path / "study", extra=("+sd", "+r"))
        assert sent.returncode == 0, sent.stderr
        refused = subprocess.run(
            [ECHOSCU, "-aet", "INTRUDER", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode != 0

        def all_recorded() -> list[tuple[int, str, str | None, int, str, str | None]] | None:
            found = rows()
            kinds = {(r[1], r[2], r[3]) for r in found}
            wanted = {("110100", "110120", 0), ("110113", "110126", 0), ("110113", "110126", 4)}
            wanted.add(("110104", None, 0))
            return found if wanted <= kinds else None

        recorded = wait_for(all_recorded, 30, what="the audit events in the catalog")
        assert all(r[5] is None for r in recorded)  # none forwarded: the collector is down
        actors = {(r[1], r[3]): r[4] for r in recorded}
        assert actors[("110113", 4)] == "INTRUDER"
        assert actors[("110104", 0)] == "STORESCU"

        # The collector comes up: everything recorded meanwhile arrives, in order.
        collector.start()

        def all_forwarded() -> list[bytes] | None:
            got = collector.received()
            return got if len(got) >= len(recorded) else None

        messages = wait_for(all_forwarded, 30, what="the collector to receive the events")
        forwarded = _event_ids(messages)
        assert forwarded[: len(recorded)] == [(r[1], r[2], str(r[3])) for r in recorded]
        study_xml = next(payload(m) for m in messages if b'csd-code="110104"' in m)
        assert study_uid.encode() in study_xml
        assert b'NetworkAccessPointID="127.0.0.1"' in (
            next(payload(m) for m in messages if b"INTRUDER" in m)
        )

        # The command line lists them, and its own read is audited (and forwarded).
        listed = json.loads(node.cli("audit", "--json").stdout)
        assert [e["event_id"] for e in listed][: len(recorded)] == [r[1] for r in recorded]
        assert listed[-1]["event_id"] == "110101"
        received = next(e for e in listed if e["event_id"] == "110104")
        assert f"study:{study_uid}" in received["participants"]
        assert received["outcome"] == 0
        assert received["actor"] == "STORESCU"
        assert received["time"][-6] in "+-"  # with its UTC offset
        since = json.loads(node.cli("audit", "--json", "--since", "1d").stdout)
        assert len(since) == len(listed) + 1
        newest = node.cli("audit", "--json", "--limit", "1")
        assert [e["event_id"] for e in json.loads(newest.stdout)] == ["110101"]
        assert "truncated" in newest.stderr
        wait_for(
            lambda: any(e[0] == "110101" for e in _event_ids(collector.received())),
            15,
            what="the audit log read to be forwarded",
        )

        # Stopping is audited too, and sent before the node exits.
        node.stop()
        assert any(e[:2] == ("110100", "110121") for e in _event_ids(collector.received()))
        assert all(r[5] is not None for r in rows())
    finally:
        collector.stop()
        engine.dispose()
