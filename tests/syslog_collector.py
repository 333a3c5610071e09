"""A small syslog collector over TLS (RFC 5425 octet-counting) for the audit trail's tests, with
a private CA and a server certificate for 127.0.0.1 made with ``tests.certs``."""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.certs import CertificateAuthority


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(folder: Path) -> Pki:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost."""
    ca = CertificateAuthority.create(folder, "CN=audit test CA")
    collector = ca.issue("collector", "CN=collector", hosts=("localhost", "127.0.0.1"))
    return Pki(ca.cert, collector.cert, collector.key)


def read_frames(buffer: bytearray) -> list[bytes]:
    """Take every whole ``MSG-LEN SP SYSLOG-MSG`` frame off the front of ``buffer``."""
    frames = []
    while True:
        space = buffer.find(b" ")
        if space <= 0:
            return frames
        length = int(buffer[:space])
        if len(buffer) < space + 1 + length:
            return frames
        frames.append(bytes(buffer[space + 1 : space + 1 + length]))
        del buffer[: space + 1 + length]


@dataclass
class SyslogCollector:
    """Listens on 127.0.0.1:``port`` over TLS and keeps every syslog message it receives."""

    pki: Pki
    port: int
    messages: list[bytes] = field(default_factory=list)
    _server: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> SyslogCollector:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.pki.cert_file), str(self.pki.key_file))
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(8)
        server.settimeout(0.2)
        self._server = server
        thread = threading.Thread(target=self._accept, args=(context,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def _accept(self, context: ssl.SSLContext) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                raw, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(context, raw), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, context: ssl.SSLContext, raw: socket.socket) -> None:
        raw.settimeout(0.5)
        try:
            connection = context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        buffer = bytearray()
        with connection:
            while not self._stop.is_set():
                try:
                    chunk = connection.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer.extend(chunk)
                frames = read_frames(buffer)
                with self._lock:
                    self.messages.extend(frames)

    def received(self) -> list[bytes]:
        with self._lock:
            return list(self.messages)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
        for thread in self._threads:
            thread.join(2)


def payload(message: bytes) -> bytes:
    """The MSG part of an RFC 5424 message the audit trail sent: after ``- `` and the BOM."""
    bom = message.index(b"\xef\xbb\xbf")
    return message[bom + 3 :]
