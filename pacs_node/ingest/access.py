"""Who may open an association: the called-AE check, the calling-AE allowlist of peers.yaml, and
the TLS client certificate a peer is bound to (its ``tls_subject``)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from enum import IntEnum

from pacs_node.config import Settings
from pacs_node.tls import subject_matches

log = logging.getLogger(__name__)


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ diagnostics, service-user source (PS3.8 9.3.4)."""

    CALLING_AE_NOT_RECOGNIZED = 0x03
    CALLED_AE_NOT_RECOGNIZED = 0x07


@dataclass(frozen=True)
class Rejection:
    reason: RejectReason
    detail: str
    certificate: bool = False  # the peer did not show the TLS certificate it is bound to


def _addresses(host: str) -> frozenset[str]:
    """The addresses a configured host stands for (an IP literal, or every address of a name)."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        log.warning("peer host cannot be resolved now; compared by name", extra={"host": host})
        return frozenset({host})
    return frozenset(str(info[4][0]) for info in infos)


class AccessPolicy:
    """Decides at A-ASSOCIATE-RQ whether to accept; built once at start from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.ae_title = settings.node.ae_title
        self.promiscuous = settings.node.promiscuous
        self._hosts: dict[str, frozenset[str] | None] = {
            peer.ae_title: (_addresses(peer.host) if peer.host else None) for peer in settings.peers
        }
        self._subjects = {p.ae_title: p.tls_subject for p in settings.peers if p.tls_subject}

    def check(
        self, calling_ae: str, called_ae: str, address: str, tls_subject: str | None = None
    ) -> Rejection | None:
        """``tls_subject``: the subject of the client certificate shown over TLS, if any."""
        if called_ae.strip() != self.ae_title:
            return Rejection(RejectReason.CALLED_AE_NOT_RECOGNIZED, "called AE title is not ours")
        calling = calling_ae.strip()
        expected = self._subjects.get(calling)
        if expected is not None and not subject_matches(expected, tls_subject):
            detail = "calling AE did not show the TLS client certificate it is bound to"
            return Rejection(RejectReason.CALLING_AE_NOT_RECOGNIZED, detail, certificate=True)
        if self.promiscuous:
            return None
        if calling not in self._hosts:
            return Rejection(RejectReason.CALLING_AE_NOT_RECOGNIZED, "calling AE is not in peers")
        hosts = self._hosts[calling]
        if hosts is not None and _normalise(address) not in hosts:
            return Rejection(
                RejectReason.CALLING_AE_NOT_RECOGNIZED, "calling AE connected from another host"
            )
        return None


def _normalise(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
