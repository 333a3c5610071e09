"""Runs the web app with uvicorn on a thread of the node's own process, beside the SCP.

uvicorn installs no signal handlers off the main thread, so the node keeps its own; the port is
bound before :meth:`WebServer.start` returns, and a port that cannot be bound fails the start
with the address and the reason.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from pacs_node.errors import ConfigError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


class WebServer:
    def __init__(self, app: FastAPI, host: str, port: int, source: str = "node.yaml") -> None:
        """``source``: where ``web_port`` was set, named when the port cannot be bound."""
        self.host = host
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
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
            # uvicorn's own logging setup would replace the node's handlers
            log_config=None,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="web", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the web server stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError("the web server did not start in time")
            time.sleep(0.02)
        log.info("web server listening", extra={"host": self.host, "port": self.port})

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._socket.close()
