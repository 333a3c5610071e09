"""Runs the web app with uvicorn on a thread of the node's own process, beside the SCP.

uvicorn installs no signal handlers off the main thread, so the node keeps its own; the port is
bound before :meth:`WebServer.start` returns, and a port that cannot be bound fails the start
with the address and the reason.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI

from pacs_node.errors import ConfigError, StartError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


class WebServer:
    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        source: str = "node.yaml",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``source``: where ``web_port`` was set, named when the port cannot be bound;
        ``tls``: serve HTTPS with this context (see :mod:`pacs_node.web.https`)."""
        self.host = host
        self.scheme = "https" if tls is not None else "http"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise ConfigError(
                source, "web_port", f"cannot listen on {host}:{port}: {exc.strerror}"
            ) from exc
        self._socket.listen(128)
        self._port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,  # stop() sets it from the time it is given
            # uvicorn's own logging setup would replace the node's handlers
            log_config=None,
        )
        if tls is not None:
            # uvicorn builds its own context from file names (no minimum version, no cipher
            # policy); loaded now, it serves the node's instead
            config.load()
            config.ssl = tls
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                raise StartError(f"the web server on port {self.port} stopped while starting")
            if time.monotonic() > deadline:
                raise StartError(f"the web server on port {self.port} did not start in time")
            time.sleep(0.02)
        log.info(
            "web server listening",
            extra={"host": self.host, "port": self.port, "scheme": self.scheme},
        )

    def _run(self) -> None:
        # uvicorn exits (SystemExit) when the app cannot start; start() says so
        with contextlib.suppress(SystemExit):
            self._server.run(sockets=[self._socket])

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop within ``timeout`` seconds: requests under way get all of it but a margin to
        finish, then are cancelled, so none outlasts the wait (nor the parts stopped next)."""
        margin = max(0.3, min(1.0, timeout / 5))  # uvicorn polls should_exit every 0.1 s
        # typed int by uvicorn, but read only by asyncio.timeout, which takes any seconds
        grace = max(0.05, timeout - margin)
        self._server.config.timeout_graceful_shutdown = grace  # type: ignore[assignment]
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._socket.close()
