"""Storage Commitment as SCU against a real SCP (pynetdicom on loopback): the N-ACTION follows
the C-STOREs on the same association and the report decides each delivery's state; a peer
without the SOP class confirms by the C-STORE success; a refused instance goes out again."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from pacs_node.dispatch.commitment import STORAGE_COMMITMENT_PUSH_MODEL, Reference
from pacs_node.dispatch.destinations import DimseDestination
from pacs_node.dispatch.dimse import CStoreHandler
from pacs_node.dispatch.handler import Delivered, Parcel, Transient
from tests.conftest import free_port
from tests.dicom_factory import write_series

pytestmark = pytest.mark.integration

CT = "1.2.840.10008.5.1.4.1.1.2"
INSTANCE = "1.2.840.10008.1.20.1.1"


def _scp(commitment: bool, refuse: set[str]) -> Callable[[], tuple[int, Any]]:
    def start() -> tuple[int, Any]:
        def on_action(event: Any) -> tuple[int, None]:
            request = event.action_information
            assoc = event.assoc

            def report() -> None:
                info = Dataset()
                info.TransactionUID = request.TransactionUID
                ok, failed = [], []
                for item in request.ReferencedSOPSequence:
                    ref = Dataset()
                    ref.ReferencedSOPClassUID = item.ReferencedSOPClassUID
                    ref.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
                    if item.ReferencedSOPInstanceUID in refuse:
                        ref.FailureReason = 0x0110
                        failed.append(ref)
                    else:
                        ok.append(ref)
                info.ReferencedSOPSequence = ok
                if failed:
                    info.FailedSOPSequence = failed
                assoc.send_n_event_report(
                    info,
                    2 if failed else 1,
                    STORAGE_COMMITMENT_PUSH_MODEL,
                    "1.2.840.10008.1.20.1.1",
                )

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
