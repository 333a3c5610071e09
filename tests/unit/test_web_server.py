"""The web server's own start and stop: a start that fails is a node error (one line for the
user, not a traceback), and a stop given N seconds is over within them, requests included."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from pacs_node.errors import StartError
from pacs_node.web.server import WebServer


def test_an_app_that_cannot_start_fails_the_start_with_a_node_error() -> None:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise OSError("the app cannot start")
        yield

    server = WebServer(FastAPI(lifespan=lifespan), "127.0.0.1", 0)
    try:
        with pytest.raises(StartError, match="stopped while starting"):
            server.start()
    finally:
        server.stop(1.0)
    assert not server.alive()


def test_a_stop_ends_requests_under_way_within_its_timeout() -> None:
    entered = threading.Event()
    app = FastAPI()

    async def slow() -> dict[str, str]:
        entered.set()
        await asyncio.sleep(60)
        return {}

    app.add_api_route("/slow", slow, methods=["GET"])
    server = WebServer(app, "127.0.0.1", 0)
    server.start()
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(httpx.get(f"http://127.0.0.1:{server.port}/slow", timeout=30))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    client = threading.Thread(target=call)
    client.start()
    try:
        assert entered.wait(10)
        started = time.monotonic()
        server.stop(1.5)  # uvicorn's fixed 5 s grace would outlast this
        assert time.monotonic() - started < 1.6
        assert not server.alive()
    finally:
        server.stop(1.0)
        client.join(10)
    # cancelled: uvicorn answers 500 when it still can, else the connection just closes
    assert outcome
    assert not isinstance(outcome[0], httpx.Response) or outcome[0].status_code == 500
