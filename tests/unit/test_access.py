"""Association access policy: called AE, calling-AE allowlist, host binding, promiscuous mode."""

from __future__ import annotations

from pacs_node.config import NodeOptions, PeerConfig, Settings
from pacs_node.ingest.access import AccessPolicy, RejectReason


def _policy(promiscuous: bool = False) -> AccessPolicy:
    settings = Settings(
        node=NodeOptions(ae_title="NODE", promiscuous=promiscuous),
        peers=(
            PeerConfig(ae_title="CT1"),
            PeerConfig(ae_title="BOUND", host="10.1.2.3"),
            PeerConfig(ae_title="LOCAL", host="localhost"),
        ),
    )
    return AccessPolicy(settings)


def test_known_peer_accepted() -> None:
    assert _policy().check("CT1", "NODE", "192.168.1.9") is None
    assert _policy().check("CT1        ", "NODE      ", "192.168.1.9") is None


def test_called_ae_must_be_ours_even_when_promiscuous() -> None:
    for policy in (_policy(), _policy(promiscuous=True)):
        rejection = policy.check("CT1", "OTHER", "10.0.0.1")
        assert rejection is not None
        assert rejection.reason is RejectReason.CALLED_AE_NOT_RECOGNIZED


def test_unknown_calling_ae_rejected_unless_promiscuous() -> None:
    rejection = _policy().check("STRANGER", "NODE", "10.0.0.1")
    assert rejection is not None
    assert rejection.reason is RejectReason.CALLING_AE_NOT_RECOGNIZED
    assert _policy(promiscuous=True).check("STRANGER", "NODE", "10.0.0.1") is None


def test_host_binding() -> None:
    policy = _policy()
    assert policy.check("BOUND", "NODE", "10.1.2.3") is None
    assert policy.check("BOUND", "NODE", "::ffff:10.1.2.3") is None
    assert policy.check("BOUND", "NODE", "10.1.2.4") is not None
    assert policy.check("LOCAL", "NODE", "127.0.0.1") is None
