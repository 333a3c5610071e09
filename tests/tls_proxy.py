"""A TLS-terminating forwarder for tests: HTTPS in front of a server that speaks only plain
HTTP (sekmet-fhir), as a hospital's load balancer would put it. Bytes pass unchanged both
ways; a backend that is down closes the client's connection (the client sees a failure)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

from tests.conftest import wait_for


class TlsProxy:
    """Serves TLS on ``127.0.0.1:port`` with ``cert``/``key`` and forwards each connection to
    ``127.0.0.1:backend_port``, until :meth:`stop`."""

    def __init__(self, port: int, backend_port: int, cert: Path, key: Path) -> None:
        self.port = port
        self.backend_port = backend_port
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context.load_cert_chain(str(cert), str(key))
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> TlsProxy:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        started.result(timeout=10)
        wait_for(lambda: self._server is not None, 10, what="the TLS proxy")
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._forward, "127.0.0.1", self.port, ssl=self._context
        )

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
                writer.close()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        if self._thread.is_alive():
            with contextlib.suppress(TimeoutError):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
