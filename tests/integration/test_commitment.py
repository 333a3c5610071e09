"""Storage Commitment as SCU against a real SCP (pynetdicom on loopback): the N-ACTION follows
the C-STOREs on the same association and the report decides each delivery's state; a peer
without the SOP class confirms by the C-STORE success; a refused instance goes out again; a
report the PACS sends later on its own association reaches a running node's SCP and settles the
deliveries in the catalog."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt

from pacs_node.commitment import STORAGE_COMMITMENT_PUSH_MODEL
from pacs_node.destinations import DimseDestination
from pacs_node.dispatch.commitment import Reference
from pacs_node.dispatch.dimse import CStoreHandler
from pacs_node.dispatch.handler import Delivered, Parcel, Transient
from tests.conftest import NodeProcess, free_port, storescu, wait_for
from tests.dicom_factory import write_series

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

CT = "1.2.840.10008.5.1.4.1.1.2"
INSTANCE = "1.2.840.10008.1.20.1.1"
RESULT_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
)


def _event_information(request: Dataset, refuse: Callable[[str], bool]) -> tuple[Dataset, int]:
    """A PACS's answer to an N-ACTION: its Event Information and Event Type (2 if any fail)."""
    info = Dataset()
    info.TransactionUID = request.TransactionUID
    ok, failed = [], []
    for item in request.ReferencedSOPSequence:
        ref = Dataset()
        ref.ReferencedSOPClassUID = item.ReferencedSOPClassUID
        ref.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
        if refuse(str(item.ReferencedSOPInstanceUID)):
            ref.FailureReason = 0x0110
            failed.append(ref)
        else:
            ok.append(ref)
    info.ReferencedSOPSequence = ok
    if failed:
        info.FailedSOPSequence = failed
    return info, 2 if failed else 1


def _scp(commitment: bool, refuse: set[str]) -> Callable[[], tuple[int, Any]]:
    def start() -> tuple[int, Any]:
        def on_action(event: Any) -> tuple[int, None]:
            request = event.action_information
            assoc = event.assoc

            def report() -> None:
                info, event_type = _event_information(request, lambda uid: uid in refuse)
                assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT_PUSH_MODEL, INSTANCE)

            threading.Timer(0.05, report).start()  # after the N-ACTION response
            return 0x0000, None

        ae = AE(ae_title="TESTSCP")
        ae.add_supported_context(CT, [ExplicitVRLittleEndian])
        if commitment:
            ae.add_supported_context(
                STORAGE_COMMITMENT_PUSH_MODEL, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        port = free_port()
        server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000), (evt.EVT_N_ACTION, on_action)],
        )
        return port, server

    return start


@pytest.fixture
def parcels(tmp_path: Path) -> list[Parcel]:
    paths = write_series(tmp_path / "ct", slices=3, rows=16, columns=16)
    return [
        Parcel(
            delivery_id=n,
            kind="seg",
            sop_class_uid=CT,
            sop_instance_uid=str(dcmread(p, stop_before_pixels=True).SOPInstanceUID),
            encodings={ExplicitVRLittleEndian: p},
        )
        for n, p in enumerate(paths)
    ]


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for server in started:
        server.shutdown()


def _destination(port: int) -> DimseDestination:
    return DimseDestination(
        type="dimse", ae_title="TESTSCP", host="127.0.0.1", port=port, commitment_wait_s=5
    )


def test_committed_on_the_same_association(parcels: list[Parcel], servers: list[Any]) -> None:
    port, server = _scp(commitment=True, refuse=set())()
    servers.append(server)
    outcomes = CStoreHandler("PACSNODE").send(_destination(port), parcels)
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert {(o.commitment, bool(o.commitment_uid)) for o in outcomes} == {("committed", True)}  # type: ignore[union-attr]
    refs = [Reference(CT, p.sop_instance_uid or "") for p in parcels]
    again = CStoreHandler("PACSNODE").commit(_destination(port), refs)  # housekeeping's re-ask
    assert {s.value for s in again.states.values()} == {"committed"}


def test_a_refused_instance_goes_out_again(parcels: list[Parcel], servers: list[Any]) -> None:
    refused = parcels[1].sop_instance_uid or ""
    port, server = _scp(commitment=True, refuse={refused})()
    servers.append(server)
    outcomes = CStoreHandler("PACSNODE").send(_destination(port), parcels)
    assert isinstance(outcomes[1], Transient)
    assert "storage commitment failed" in outcomes[1].reason
    assert [o.commitment for o in (outcomes[0], outcomes[2])] == ["committed"] * 2  # type: ignore[union-attr]


def test_without_the_sop_class_the_c_store_confirms(
    parcels: list[Parcel], servers: list[Any]
) -> None:
    port, server = _scp(commitment=False, refuse=set())()
    servers.append(server)
    outcomes = CStoreHandler("PACSNODE").send(_destination(port), parcels)
    assert {o.commitment for o in outcomes} == {"unsupported"}  # type: ignore[union-attr]


class _LatePacs:
    """A PACS that answers the N-ACTION at once but sends the report later on an association of
    its own, as the Push Model's SCP (what Orthanc does); it refuses ``refuse_once`` the first
    time it is asked about it."""

    def __init__(
        self, node: NodeProcess, port: int, refuse_once: int, reporter: str = "LATEPACS"
    ) -> None:
        self.node = node
        self.refuse_left = refuse_once
        self.reporter = reporter  # the AE title the report comes from
        self.stored: list[str] = []
        self.reports: list[int] = []  # N-EVENT-REPORT statuses the node answered
        self.ae = AE(ae_title="LATEPACS")
        self.ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
        for sop_class in RESULT_CLASSES:
            self.ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self.server = self.ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)],
        )

    def _on_store(self, event: Any) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _refuse(self, _uid: str) -> bool:
        if self.refuse_left > 0:
            self.refuse_left -= 1
            return True
        return False

    def _on_action(self, event: Any) -> tuple[int, None]:
        request = event.action_information
        threading.Thread(target=self._report, args=(request,), daemon=True).start()
        return 0x0000, None

    def _report(self, request: Dataset) -> None:
        info, event_type = _event_information(request, self._refuse)
        reporter = AE(ae_title=self.reporter)
        reporter.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
        role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scp_role=True)
        assoc = reporter.associate(
            "127.0.0.1", self.node.port, ae_title=self.node.ae_title, ext_neg=[role]
        )
        assert assoc.is_established, "the node refused the report's association"
        status, _ = assoc.send_n_event_report(
            info, event_type, STORAGE_COMMITMENT_PUSH_MODEL, INSTANCE
        )
        self.reports.append(int(status.Status))
        assoc.release()


def test_a_report_on_the_pacs_own_association_settles_the_deliveries(
    tmp_path: Path, make_node: Callable[..., NodeProcess]
) -> None:
    pacs_port = free_port()
    node = make_node(
        peers=[
            {"ae_title": "LATEPACS", "host": "127.0.0.1", "port": pacs_port},
            {"ae_title": "PACSNODE_SCU", "host": "127.0.0.1"},
        ],
        models_dir=str(ROOT / "models"),
        job_workers=1,
        dicom_workers=1,  # the report goes through a spawned SCP process, as in production
        delivery_backoff_s=0.5,
        delivery_backoff_max_s=2.0,
    )
    pacs = _LatePacs(node, pacs_port, refuse_once=1)
    try:
        paths = write_series(tmp_path / "ct", slices=12, rows=48, columns=48, spacing=(5, 5, 5))
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        sent = storescu(node, *paths, calling="LATEPACS")
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: any(s["instances"] == 12 for s in node.studies()), 60, what="the study")
        node.cli("run", study_uid, "--model", "ct-classical")

        def committed() -> list[dict[str, Any]] | None:
            rows = json.loads(node.cli("deliveries", "--json").stdout)
            done = rows and all(
                (d["state"], d["commitment"]) == ("delivered", "committed") for d in rows
            )
            return rows if done else None

        try:
            deliveries = wait_for(committed, 120, interval=0.5, what="every delivery committed")
        except AssertionError as exc:
            rows = node.cli("deliveries", "--json").stdout
            raise AssertionError(f"{exc}\n{rows}\n{node.log_text()[-4000:]}") from None
    finally:
        pacs.server.shutdown()
    assert len(pacs.reports) >= 2  # the first, with the refusal, and the resent one's
    assert set(pacs.reports) == {0x0000}  # the node answered every report with success
    attempts = sorted(d["attempts"] for d in deliveries)
    assert attempts == [1] * (len(deliveries) - 1) + [2]  # the refused one went out again
    assert len(pacs.stored) == len(deliveries) + 1
    assert "storage commitment report recorded" in node.log_text()


def _counter(node: NodeProcess, name: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{node.data_dir / 'catalog.sqlite'}")
    try:
        with engine.connect() as connection:
            value = connection.execute(
                text("SELECT value FROM counters WHERE name = :name"), {"name": name}
            ).scalar()
    finally:
        engine.dispose()
    return int(value or 0)


def test_a_report_from_another_ae_settles_nothing(
    tmp_path: Path, make_node: Callable[..., NodeProcess]
) -> None:
    """Another allowed AE that knows the Transaction UID cannot confirm the deliveries: only
    the destination that was asked can (which may then let retention remove the study)."""
    pacs_port = free_port()
    node = make_node(
        peers=[
            {"ae_title": "LATEPACS", "host": "127.0.0.1", "port": pacs_port},
            {"ae_title": "INTRUDER", "host": "127.0.0.1"},  # allowed to send, not asked
            {"ae_title": "PACSNODE_SCU", "host": "127.0.0.1"},
        ],
        models_dir=str(ROOT / "models"),
        job_workers=1,
        dicom_workers=1,
    )
    pacs = _LatePacs(node, pacs_port, refuse_once=0, reporter="INTRUDER")
    try:
        paths = write_series(tmp_path / "ct", slices=12, rows=48, columns=48, spacing=(5, 5, 5))
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        sent = storescu(node, *paths, calling="LATEPACS")
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: any(s["instances"] == 12 for s in node.studies()), 60, what="the study")
        node.cli("run", study_uid, "--model", "ct-classical")
        wait_for(
            lambda: _counter(node, "commitment_reports_refused") >= 1,
            120,
            interval=0.5,
            what="the foreign report refused",
        )

        # The SEG and SR go first; the rest may still be on its way when the report comes.
        def settled() -> list[dict[str, Any]] | None:
            rows: list[dict[str, Any]] = json.loads(node.cli("deliveries", "--json").stdout)
            done = rows and all(r["state"] == "delivered" and r["commitment"] for r in rows)
            return rows if done else None

        deliveries = wait_for(settled, 60, interval=0.5, what="every delivery sent and asked")
    finally:
        pacs.server.shutdown()
    assert set(pacs.reports) == {0x0000}  # answered (it is an allowed AE), then not trusted
    assert {(d["state"], d["commitment"]) for d in deliveries} == {("delivered", "requested")}
    assert "it settles nothing" in node.log_text()
