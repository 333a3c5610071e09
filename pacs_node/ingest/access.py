"""Who may open an association: the called-AE check and the calling-AE allowlist of peers.yaml."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from enum import IntEnum

from pacs_node.config import Settings

log = logging.getLogger(__name__)


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ diagnostics, service-user source (PS3.8 9.3.4)."""

    CALLING_AE_NOT_RECOGNIZED = 0x03
    CALLED_AE_NOT_RECOGNIZED = 0x07


@dataclass(frozen=True)
class Rejection:
    reason: RejectReason
    detail: str


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

    def check(self, calling_ae: str, called_ae: str, address: str) -> Rejection | None:
        if called_ae.strip() != self.ae_title:
            return Rejection(RejectReason.CALLED_AE_NOT_RECOGNIZED, "called AE title is not ours")
        if self.promiscuous:
            return None
        calling = calling_ae.strip()
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
