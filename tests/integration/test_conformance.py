"""docs/conformance.md stays true: a running node accepts every SOP class and transfer syntax the
statement lists as accepted (real associations from pynetdicom), refuses what it says it refuses,
and the statuses and option defaults it lists are those of the code."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pydicom import Dataset
from pynetdicom import AE, build_role
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from pacs_node.config import NodeOptions
from pacs_node.ingest import statuses
from tests.conftest import NodeProcess

pytestmark = pytest.mark.integration

DOC = (Path(__file__).resolve().parents[2] / "docs" / "conformance.md").read_text()
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
_UID = re.compile(r"^\| [^|]+ \| `([0-9.]+)` \|", re.MULTILINE)


def section(number: str) -> str:
    """The text of ``### <number> ...`` up to the next heading."""
    match = re.search(rf"^#+ {re.escape(number)}\.? .*?$(.*?)(?=^#)", DOC, re.MULTILINE | re.DOTALL)
    assert match, number
    return match.group(1)


def _associate(
    node: NodeProcess, contexts: list[tuple[str, str]], calling: str = "PACSNODE_SCU"
) -> Association:
    ae = AE(ae_title=calling)
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in contexts]
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)


def _accepted(node: NodeProcess, contexts: list[tuple[str, str]]) -> set[tuple[str, str]]:
    assoc = _associate(node, contexts)
    assert assoc.is_established
    try:
        return {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
    finally:
        assoc.release()


def test_listed_sop_classes_and_transfer_syntaxes_are_accepted(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node(dicom_workers=1)
    sop_classes = _UID.findall(section("4.2"))
    syntaxes = _UID.findall(section("4.3"))
    assert len(sop_classes) >= 30
    assert len(syntaxes) >= 20
    wanted = [(sop, EXPLICIT_LE) for sop in sop_classes]
    assert _accepted(node, wanted) == set(wanted)
    wanted = [(CT, ts) for ts in syntaxes]  # each syntax in its own context, accepted as proposed
    assert _accepted(node, wanted) == set(wanted)
    (verification,) = _UID.findall(section("4.1"))
    assert _accepted(node, [(verification, "1.2.840.10008.1.2")]) == {
        (verification, "1.2.840.10008.1.2")
    }
    # "Known non-storage services are refused"
    assoc = _associate(node, [(STUDY_ROOT_FIND, EXPLICIT_LE), (CT, EXPLICIT_LE)])
    try:
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [CT]
    finally:
        assoc.release()
    # section 3: the called AE title and the calling-AE allowlist
    stranger = _associate(node, [(CT, EXPLICIT_LE)], calling="STRANGER")
    assert stranger.is_rejected
    ae = AE(ae_title="PACSNODE_SCU")
    ae.add_requested_context(CT)
    wrong = ae.associate("127.0.0.1", node.port, ae_title="NOT_THE_NODE")
    assert wrong.is_rejected


def test_listed_statuses_are_the_codes_table() -> None:
    listed = {
        int(code, 16)
        for code in re.findall(r"^\| `(0x[0-9A-F]{4})` \|", section("4.4"), re.MULTILINE)
    }
    defined = {
        value for name, value in vars(statuses).items() if name.isupper() and isinstance(value, int)
    }
    assert listed == defined


def test_listed_option_defaults_are_the_config_defaults() -> None:
    rows = re.findall(
        r"^\| [^|]+ \| `([^`]*)`[^|]* \| `(\w+)` \|$", section("2") + section("3"), re.MULTILINE
    )
    checked = 0
    for default, name in rows:
        assert name in NodeOptions.model_fields, name
        expected = NodeOptions.model_fields[name].default
        assert yaml.safe_load(default) == expected, name
        checked += 1
    assert checked >= 10


def test_storage_commitment_reports_are_taken_as_listed(
    make_node: Callable[..., NodeProcess],
) -> None:
    """4.6: the Push Model with the requestor as SCP; the answers the statement lists."""
    node = make_node(dicom_workers=1)
    (push_model,) = _UID.findall(section("4.6"))
    listed = set(re.findall(r"`(0x[0-9A-F]{4})`", section("4.6")))
    assert listed == {"0x0000", "0x0110", "0x0113"}
    ae = AE(ae_title="PACSNODE_SCU")
    ae.add_requested_context(push_model)
    assoc = ae.associate(
        "127.0.0.1",
        node.port,
        ae_title=node.ae_title,
        ext_neg=[build_role(push_model, scp_role=True)],
    )
    assert assoc.is_established
    try:
        (context,) = assoc.accepted_contexts
        assert str(context.abstract_syntax) == push_model
        info = Dataset()
        info.TransactionUID = "2.25.1234"  # no request of ours: nothing to settle, still taken
        info.ReferencedSOPSequence = []
        answers = [
            assoc.send_n_event_report(info, event_type, push_model, COMMITMENT_INSTANCE)[0]
            for event_type in (1, 7)
        ]
        assert [int(a.Status) for a in answers] == [0x0000, 0x0113]
        info.TransactionUID = "1.2.x" * 20  # unreadable: never reaches the catalog
        (bad, _) = assoc.send_n_event_report(info, 1, push_model, COMMITMENT_INSTANCE)
        assert int(bad.Status) == 0x0110
    finally:
        assoc.release()
    requester = AE(ae_title="PACSNODE_SCU")
    requester.add_requested_context(push_model)
    assoc = requester.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    try:
        action = Dataset()
        action.TransactionUID = "2.25.5678"
        action.ReferencedSOPSequence = []
        status, _ = assoc.send_n_action(action, 1, push_model, COMMITMENT_INSTANCE)
        assert int(status.Status) == 0x0110  # the node is not a Storage Commitment SCP
    finally:
        assoc.release()
