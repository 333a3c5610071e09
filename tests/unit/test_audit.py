"""The audit trail's pure parts and its catalog side: every kind of event builds a PS3.15
AuditMessage that the shipped schema accepts; syslog framing; recording; the durable forwarder."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from lxml import etree

from pacs_node.actor import Actor
from pacs_node.audit import events
from pacs_node.audit.message import InvalidAuditMessage, build, validate
from pacs_node.audit.syslog import Collector, SyslogForwarder, format_message, frame
from pacs_node.audit.trail import AuditTrail, record_now
from pacs_node.catalog.audit import AuditRow, list_events, unsent
from pacs_node.catalog.db import Catalog, open_catalog
from pacs_node.services.audit import audit_operation, parse_since, read_audit_log
from pacs_node.web.audit import classify
from tests.conftest import free_port, wait_for
from tests.syslog_collector import SyslogCollector, make_pki, payload, read_frames

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = events.StudyObject("1.2.826.0.1.3680043.8.498.1", "PID-7", ((CT, 3),), "ACC-1", "Doe^Jane")

KINDS: dict[str, Callable[[], events.AuditEvent]] = {
    "association accepted": lambda: events.association(
        "PACSNODE", "CT1", "10.0.0.1", accepted=True, tls_subject="CN=ct1,O=Hospital"
    ),
    "association rejected": lambda: events.association(
        "PACSNODE", "CT1", "::1", accepted=False, reason="unknown AE"
    ),
    "hostile pdu": lambda: events.security_alert(
        "PACSNODE", "hostile-pdu", "10.0.0.9", "oversized PDU", repeats=4
    ),
    "certificate refused": lambda: events.security_alert(
        "PACSNODE", "node-authentication", "10.0.0.9", "no client certificate"
    ),
    "study received": lambda: events.study_received("PACSNODE", "CT1", STUDY),
    "sent by C-STORE": lambda: events.results_sent(
        "PACSNODE", "PACS", "pacs:104", STUDY, fhir=False, ok=True
    ),
    "FHIR export failed": lambda: events.results_sent(
        "PACSNODE", "EHR", "ehr.example", STUDY, fhir=True, ok=False, reason="HTTP 503"
    ),
    "query": lambda: events.query("user:ana", "127.0.0.1", "PACSNODE", "/studies?PatientID=1"),
    "read": lambda: events.instances_read("user:ana", "127.0.0.1", STUDY, "viewer"),
    "login failed": lambda: events.user_authentication(
        "ana", "127.0.0.1", login=True, ok=False, reason="bad password"
    ),
    "logout": lambda: events.user_authentication("ana", None, login=False, ok=True),
    "start": lambda: events.application_activity("PACSNODE", start=True, launcher="pacs"),
    "stop": lambda: events.application_activity("PACSNODE", start=False),
    "audit log used": lambda: events.audit_log_used("user:root", "sqlite:///c.sqlite"),
    "retention purge": lambda: events.study_deleted("node:housekeeping", STUDY, "retention"),
    "re-run": lambda: events.operator_action("user:ana", "rerun", STUDY),
    "reject": lambda: events.operator_action("user:ana", "reject", STUDY),
    "user created": lambda: events.user_changed("user:root", "ana", "created", role_changed=True),
}

EXPECTED = {
    "association accepted": ("110113", "E", "0", "110126"),
    "association rejected": ("110113", "E", "4", "110126"),
    "hostile pdu": ("110113", "E", "4", "110132"),
    "certificate refused": ("110113", "E", "4", "110126"),
    "study received": ("110104", "C", "0", None),
    "sent by C-STORE": ("110104", "R", "0", None),
    "FHIR export failed": ("110106", "R", "8", None),
    "query": ("110112", "E", "0", None),
    "read": ("110103", "R", "0", None),
    "login failed": ("110114", "E", "4", "110122"),
    "logout": ("110114", "E", "0", "110123"),
    "start": ("110100", "E", "0", "110120"),
    "stop": ("110100", "E", "0", "110121"),
    "audit log used": ("110101", "R", "0", None),
    "retention purge": ("110105", "D", "0", None),
    "re-run": ("110103", "C", "0", None),
    "reject": ("110103", "D", "0", None),
    "user created": ("110113", "E", "0", "110136"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_event_kind_is_a_valid_ps3_15_audit_message(kind: str) -> None:
    xml = build(KINDS[kind](), source_id="node-host")
    validate(xml)
    root = etree.fromstring(xml)
    ident = root.find("EventIdentification")
    assert ident is not None
    event_id, action, outcome, type_code = EXPECTED[kind]
    assert ident.find("EventID").get("csd-code") == event_id  # type: ignore[union-attr]
    assert ident.find("EventID").get("codeSystemName") == "DCM"  # type: ignore[union-attr]
    assert ident.get("EventActionCode") == action
    assert ident.get("EventOutcomeIndicator") == outcome
    types = [t.get("csd-code") for t in ident.findall("EventTypeCode")]
    assert types == ([type_code] if type_code else [])
    # the time carries its UTC offset
    assert re.search(r"([+-]\d\d:\d\d|Z)$", ident.get("EventDateTime", ""))
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "node-host"  # type: ignore[union-attr]
    assert root.findall("ActiveParticipant")


def test_study_and_patient_objects_follow_the_standard() -> None:
    root = etree.fromstring(build(KINDS["study received"]()))
    study, patient = root.findall("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == STUDY.study_uid
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"  # type: ignore[union-attr]
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == (
        "2",
        "3",
    )
    assert study.find("SOPClass") is None  # only inside a ParticipantObjectDescription
    described = study.find("ParticipantObjectDescription")
    assert described is not None
    sop = described.find("SOPClass")
    assert sop is not None
    assert (sop.get("UID"), sop.get("NumberOfInstances")) == (CT, "3")
    assert described.find("Accession").get("Number") == "ACC-1"  # type: ignore[union-attr]
    assert patient.get("ParticipantObjectID") == "PID-7"
    assert patient.findtext("ParticipantObjectName") == "Doe^Jane"  # PHI, by design
    assert patient.find("ParticipantObjectIDTypeCode").get("csd-code") == "2"  # type: ignore[union-attr]
    assert (
        patient.get("ParticipantObjectTypeCode"),
        patient.get("ParticipantObjectTypeCodeRole"),
    ) == ("1", "1")
    source_type = root.find("AuditSourceIdentification/AuditSourceTypeCode")
    assert source_type is not None
    assert dict(source_type.attrib) == {"csd-code": "4"}  # the schema's own value, no scheme
    accepted = etree.fromstring(build(KINDS["association accepted"]()))
    peer, node = accepted.findall("ActiveParticipant")
    assert peer.get("UserID") == "CT1"
    assert peer.get("AlternativeUserID") == "AETITLES=CT1"
    assert peer.get("UserName") == "CN=ct1,O=Hospital"  # the TLS identity
    assert node.get("UserID") == str(os.getpid())  # the process; its AE title apart
    assert node.get("AlternativeUserID") == "AETITLES=PACSNODE"
    assert (peer.get("NetworkAccessPointID"), peer.get("NetworkAccessPointTypeCode")) == (
        "10.0.0.1",
        "2",
    )
    export = etree.fromstring(build(KINDS["FHIR export failed"]()))
    media = export.findall("ActiveParticipant")[1]
    assert media.find("RoleIDCode").get("csd-code") == "110154"  # type: ignore[union-attr]
    assert media.find("MediaIdentifier/MediaType").get("csd-code") == "110037"  # type: ignore[union-attr]
    query = etree.fromstring(build(KINDS["query"]())).find("ParticipantObjectIdentification")
    assert query is not None
    assert query.get("ParticipantObjectTypeCodeRole") == "3"
    assert query.findtext("ParticipantObjectQuery") == "L3N0dWRpZXM/UGF0aWVudElEPTE="
    log_used = etree.fromstring(build(KINDS["audit log used"]()))
    assert log_used.findtext("ParticipantObjectIdentification/ParticipantObjectName") == (
        "Security Audit Log"
    )


def test_the_schema_refuses_what_the_standard_refuses() -> None:
    good = build(KINDS["start"]())
    validate(good)
    studied = build(events.study_received("PACSNODE", "CT1", replace(STUDY, patient_name=None)))
    validate(studied)
    broken = [
        good.replace(b'EventOutcomeIndicator="0"', b'EventOutcomeIndicator="3"'),
        re.sub(rb"<ActiveParticipant[^>]*>(.*?</ActiveParticipant>)?", b"", good),
        good.replace(b"<AuditSourceIdentification", b"<AuditSource"),
        good.replace(b'csd-code="4"/>', b'csd-code="4" codeSystemName="DCM"/>'),  # half a code
        studied.replace(b"<ParticipantObjectName>PID-7</ParticipantObjectName>", b""),
        studied.replace(b"<ParticipantObjectDescription>", b"").replace(
            b"</ParticipantObjectDescription>", b""
        ),
        studied.replace(b'TypeCodeRole="1"', b'TypeCodeRole="27"'),
        b"<AuditMessage/>",
        b"not xml",
    ]
    for xml in broken:
        with pytest.raises(InvalidAuditMessage):
            validate(xml)


def test_events_need_an_offset_and_a_participant() -> None:
    with pytest.raises(ValueError, match="offset"):
        events.AuditEvent(
            events.QUERY,
            "E",
            events.Outcome.SUCCESS,
            datetime(2026, 1, 1),
            (events.Participant("a", True),),
        )
    with pytest.raises(ValueError, match="participant"):
        events.AuditEvent(events.QUERY, "E", events.Outcome.SUCCESS, datetime.now(UTC), ())


def test_syslog_message_and_octet_counting_frame() -> None:
    at = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
    message = format_message("<AuditMessage/>", hostname="node1", at=at, procid="42")
    assert message.startswith(
        b"<85>1 2026-12-05T10:00:00.000+00:00 node1 pacs-node 42 IHE+RFC-3881 - \xef\xbb\xbf"
    )
    framed = frame(message) + frame(b"second")
    assert framed.startswith(f"{len(message)} ".encode())
    buffer = bytearray(framed + b"12 incomp")
    assert read_frames(buffer) == [message, b"second"]
    assert payload(message) == b"<AuditMessage/>"


def test_parse_since() -> None:
    now = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-12-05T10:00+01:00") == datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
    assert parse_since("2026-12-05").tzinfo is not None
    with pytest.raises(ValueError, match="not a time"):
        parse_since("yesterday")


def test_web_paths_are_classified() -> None:
    uid = "1.2.3.4"
    assert classify("/dicomweb/studies") == ("query", None)
    assert classify(f"/dicomweb/studies/{uid}/series") == ("query", None)
    assert classify(f"/dicomweb/studies/{uid}/series/5.6/instances/7.8") == ("read", f"wado:{uid}")
    assert classify(f"/dicomweb/studies/{uid}/metadata") == ("read", f"wado:{uid}")
    assert classify(f"/studies/{uid}") == ("read", f"study page:{uid}")
    assert classify(f"/studies/{uid}/jobs/3/viewer") == ("read", f"viewer:{uid}")
    assert classify(f"/api/studies/{uid}") == ("read", f"api:{uid}")
    assert classify("/studies/rows") == ("query", None)
    assert classify("/") == ("query", None)  # the dashboard lists patients' names
    assert classify("/api/studies") == ("query", None)
    assert classify("/healthz") == ("", None)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    opened = open_catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    yield opened
    opened.dispose()


def test_trail_records_in_order_and_folds_alert_floods(catalog: Catalog) -> None:
    trail = AuditTrail(catalog, "PACSNODE")
    trail.start()
    trail.record(KINDS["start"]())
    for _ in range(50):  # a flood from one address: one row now, the rest folded
        trail.security_alert("hostile-pdu", "10.0.0.9", "oversized PDU")
    trail.security_alert("hostile-pdu", "10.0.0.10", "oversized PDU")
    trail.take(events.Alert("node-authentication", "10.0.0.11", "bad certificate", "CT9", "CN=x"))
    assert trail.wait_idle(10)
    trail.stop()  # writes the folded repeats
    with catalog.sessions() as session:
        rows = list_events(session).rows
    assert [r.event_id for r in rows] == ["110100"] + ["110113"] * 4
    assert [r.event_type for r in rows[1:4]] == ["110132", "110132", "110126"]
    assert "and 49 more like it" in (rows[-1].description or "") + (rows[-2].description or "")
    assert rows[3].actor == "CT9"
    assert "CN=x" in rows[3].message
    for row in rows:
        validate(row.message.encode())


def test_reading_the_trail_is_audited(catalog: Catalog) -> None:
    assert record_now(catalog, KINDS["study received"]())
    rows = read_audit_log(catalog, Actor.user("officer")).rows
    assert [r.event_id for r in rows] == ["110104", "110101"]
    assert rows[1].actor == "user:officer"
    assert rows[0].participants == ["CT1", "PACSNODE", f"study:{STUDY.study_uid}", "patient:PID-7"]
    later = read_audit_log(catalog, Actor.user("officer"), datetime.now(UTC) + timedelta(hours=1))
    assert later.rows == []


def test_forwarder_keeps_events_while_the_collector_is_away(
    catalog: Catalog, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    for kind in ("start", "study received", "query"):
        record_now(catalog, KINDS[kind]())
    forwarder = SyslogForwarder(catalog, Collector("127.0.0.1", port, pki.ca_file))
    with pytest.raises(ConnectionRefusedError):
        forwarder.send_pending()
    with catalog.sessions() as session:
        assert len(unsent(session)) == 3  # nothing lost, nothing marked
    collector = SyslogCollector(pki, port).start()
    try:
        assert forwarder.send_pending() == 3
        record_now(catalog, KINDS["stop"]())
        assert forwarder.send_pending() == 1
        got = wait_for(lambda: len(collector.received()) >= 4 and collector.received(), 10)
        ids = [etree.fromstring(payload(m)).find("EventIdentification/EventID") for m in got]
        assert [i.get("csd-code") for i in ids if i is not None] == [
            "110100",
            "110104",
            "110112",
            "110100",
        ]
        for message in got:
            validate(payload(message))
        # the syslog TIMESTAMP is the event's time, as the message's EventDateTime says
        with catalog.sessions() as session:
            assert unsent(session) == []
            recorded = list_events(session).rows
        stamps = [datetime.fromisoformat(m.split(b" ")[1].decode()) for m in got]
        times = [datetime.fromisoformat(r.time) for r in recorded]
        assert all(
            abs(s - t) < timedelta(milliseconds=1) for s, t in zip(stamps, times, strict=True)
        )
        # The collector restarts: the idle connection's EOF is seen, the next event goes out
        # on a new connection to the new collector.
        collector.stop()
        collector = SyslogCollector(pki, port).start()
        record_now(catalog, KINDS["logout"]())
        assert forwarder.send_pending() == 1
        (again,) = wait_for(collector.received, 10)
        validate(payload(again))
    finally:
        forwarder.stop()
        collector.stop()


def test_forwarder_refuses_a_collector_it_cannot_verify(catalog: Catalog, tmp_path: Path) -> None:
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other")
    port = free_port()
    record_now(catalog, KINDS["start"]())
    collector = SyslogCollector(pki, port).start()
    try:
        forwarder = SyslogForwarder(catalog, Collector("127.0.0.1", port, other.ca_file))
        with pytest.raises(ssl.SSLCertVerificationError):
            forwarder.send_pending()
        with catalog.sessions() as session:
            assert len(unsent(session)) == 1
    finally:
        collector.stop()


def test_control_characters_in_peer_input_never_cost_the_event() -> None:
    hostile = events.StudyObject("1.2.3", "PID\x07X", ((CT, 1),))
    for event in (
        events.study_received("PACSNODE", "EVIL\x01AE", hostile),
        events.security_alert("PACSNODE", "hostile-pdu", "10.0.0.9", "bad\x00pdu\ud800"),
    ):
        xml = build(event)
        validate(xml)
        assert "\ufffd" in xml.decode("utf-8")


def test_an_audit_failure_never_undoes_the_transaction_it_rides_in(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pacs_node.catalog import audit as catalog_audit

    good = KINDS["start"]()
    with catalog.sessions.begin() as session:
        catalog_audit.add_events(session, [(good, build(good))])  # stands for the settle
        monkeypatch.setattr(catalog_audit, "build", _raise)
        assert catalog_audit.add_events_within(session, [KINDS["read"]()]) == 0
        monkeypatch.undo()

        def broken_add(*_args: object) -> None:
            raise RuntimeError("database refused")

        monkeypatch.setattr(catalog_audit, "add_events", broken_add)
        assert catalog_audit.add_events_within(session, [KINDS["read"]()]) == 0
    with catalog.sessions() as session:
        assert [r.event_id for r in list_events(session).rows] == ["110100"]
    assert [r.getMessage() for r in caplog.records].count("audit event not recorded") == 2


def _raise(*_args: object) -> bytes:
    raise ValueError("not XML")


def test_floods_are_queued_folded_per_key_and_summed_up_when_the_window_ends(
    catalog: Catalog,
) -> None:
    trail = AuditTrail(catalog, "PACSNODE")
    trail.folds.window_s = 0.3
    trail.start()
    for _ in range(30):  # a flood of bad tokens from one address: one row, then a count
        trail.sign_in_refused(None, "10.0.0.5", "API token refused")
    trail.sign_in_refused("ana", "10.0.0.6", "sign-in refused")
    for ae in ("CT1", "CT2", "CT1"):  # the calling AE is part of an alert's key
        trail.security_alert("node-authentication", "10.0.0.7", "rejected", ae)
    for counter in ("oversized_pdus", "local_limit"):  # no address: kept apart by counter
        trail.security_alert("hostile-pdu", None, counter)

    def rows() -> list[AuditRow]:
        with catalog.sessions() as session:
            return list_events(session).rows

    # the counts arrive when their windows end, with no later event to carry them
    assert wait_for(lambda: len(rows()) == 8, timeout=10)
    trail.stop()
    got = rows()
    assert [(r.event_id, r.actor) for r in got[:6]] == [
        ("110114", "unknown user"),
        ("110114", "ana"),
        ("110113", "CT1"),
        ("110113", "CT2"),
        ("110113", "unknown"),
        ("110113", "unknown"),
    ]
    summaries = {r.actor: r.description for r in got[6:]}
    assert summaries["unknown user"] == "API token refused (and 29 more like it)"
    assert "(and 1 more like it)" in (summaries["CT1"] or "")


def test_the_writer_survives_any_error_and_keeps_the_event(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pacs_node.audit import trail as trail_module

    real = trail_module.add_events
    calls = []

    def flaky(session: object, items: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("unexpected")
        real(session, items)  # type: ignore[arg-type]

    monkeypatch.setattr(trail_module, "add_events", flaky)
    trail = AuditTrail(catalog, "PACSNODE")
    trail.listeners.append(lambda: 1 / 0)  # a broken listener neither
    trail.start()
    trail.record(KINDS["start"]())
    assert trail.wait_idle(10)
    assert trail.alive()
    trail.stop()
    with catalog.sessions() as session:
        assert [r.event_id for r in list_events(session).rows] == ["110100"]


def test_an_operation_on_a_job_gone_names_no_made_up_study(catalog: Catalog) -> None:
    audit_operation(catalog, Actor.user("ana"), "retry", job_id=12)
    with catalog.sessions() as session:
        (row,) = list_events(session).rows
    assert row.participants == ["user:ana"]
    assert row.description == "retry (job 12)"
    validate(row.message.encode())


def test_the_trail_pages_from_the_newest_and_says_when_it_left_some_out(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(5):
        assert record_now(catalog, KINDS["start"]())
    officer = Actor.user("officer")
    newest = read_audit_log(catalog, officer, limit=3)  # its own 110101 is the newest
    assert newest.truncated
    assert [r.event_id for r in newest.rows] == ["110100", "110100", "110101"]
    assert newest.rows[0].id == 4
    first = read_audit_log(catalog, officer, limit=4, after_id=0)
    assert ([r.id for r in first.rows], first.truncated) == ([1, 2, 3, 4], True)
    rest = read_audit_log(catalog, officer, limit=4, after_id=4)
    assert ([r.id for r in rest.rows], rest.truncated) == ([5, 6, 7, 8], False)  # reads too
    from pacs_node.services import audit as service

    monkeypatch.setattr(service, "record_now", lambda *_: False)
    with pytest.raises(service.AuditUnavailable):  # no reading the trail unseen
        read_audit_log(catalog, officer)


def test_a_message_off_the_schema_is_kept_and_said(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pacs_node.audit import trail as trail_module

    monkeypatch.setattr(trail_module, "build", lambda _e: b"<AuditMessage/>")
    trail = AuditTrail(catalog, "PACSNODE")
    trail.start()
    trail.record(KINDS["read"]())
    assert trail.wait_idle(10)
    trail.stop()
    with catalog.sessions() as session:
        assert [r.message for r in list_events(session).rows] == ["<AuditMessage/>"]
    (said,) = [r for r in caplog.records if "schema" in r.getMessage()]
    assert said.event_id == "110103"
    assert "PID-7" not in str(said.__dict__)


def test_a_collector_file_that_does_not_load_is_a_config_error(tmp_path: Path) -> None:
    from pacs_node.config import NodeOptions, Settings
    from pacs_node.errors import ConfigError
    from pacs_node.node import Node

    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate")
    pki = make_pki(tmp_path / "pki")
    cases = [
        ({"audit_syslog_ca_file": str(tmp_path / "missing.pem")}, "audit_syslog_ca_file"),
        ({"audit_syslog_ca_file": str(garbage)}, "audit_syslog_ca_file"),
        (
            {"audit_syslog_ca_file": str(pki.ca_file), "audit_syslog_cert_file": str(garbage)},
            "audit_syslog_cert_file",
        ),
    ]
    for files, key in cases:
        options = NodeOptions(
            data_dir=tmp_path / "var", audit_syslog_host="127.0.0.1", fsync=False, **files
        )
        with pytest.raises(ConfigError) as refused:
            Node(Settings(node=options))
        assert (refused.value.key, refused.value.source.endswith("node.yaml")) == (key, True)
