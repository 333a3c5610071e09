"""The main process's side of the SCP worker pipes: merged in acknowledgement order, and a
worker killed in the middle of a message costs only its own pipe."""

from __future__ import annotations

import multiprocessing
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from pacs_node.config import NodeOptions, Settings
from pacs_node.ingest import workers as workers_module
from pacs_node.ingest.limits import SharedLimits
from pacs_node.ingest.scp import limits_for
from pacs_node.ingest.workers import SCPWorkers, _PipeSink
from pacs_node.refs import CommitmentReport, InstanceRef


class _Sink:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def submit(self, ref: InstanceRef) -> None:
        self.seen.append(ref.sop_instance_uid)

    def count(self, name: str, by: int = 1) -> None:
        self.seen.append(name)

    def duplicate(self, study_uid: str) -> None:
        self.seen.append(study_uid)

    def commitment_report(self, report: CommitmentReport) -> None:
        self.seen.append("report")


def test_the_pump_merges_worker_pipes_oldest_first_past_a_torn_message() -> None:
    sink = _Sink()
    workers = SCPWorkers(Settings(node=NodeOptions()), sink, count=2)
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(3)]
    (_, one), (_, two), (_, torn) = pipes
    one.send((1.0, "duplicate", "a"))
    one.send((4.0, "duplicate", "d"))
    two.send((2.0, "duplicate", "b"))
    two.send((3.0, "duplicate", "c"))
    # A worker SIGKILLed while writing: the header promises more than ever arrives.
    os.write(torn.fileno(), struct.pack("!i", 1000) + b"partial")
    for _reader, writer in pipes:
        writer.close()
    workers._pipes.extend(reader for reader, _writer in pipes)
    workers._stopping.set()
    pump = threading.Thread(target=workers._pump, daemon=True)
    pump.start()
    pump.join(10)
    assert not pump.is_alive()  # every pipe read to its end, none left waiting
    assert sink.seen == ["a", "b", "c", "d"]
    assert workers._pipes == []


def test_a_worker_sink_stamps_each_message_in_order() -> None:
    reader, writer = multiprocessing.get_context("spawn").Pipe(duplex=False)
    sink = _PipeSink(writer)
    sink.count("x")
    sink.duplicate("1.2")
    first, second = reader.recv(), reader.recv()
    assert first[1:] == ("count", ("x", 1))
    assert second[1:] == ("duplicate", "1.2")
    assert first[0] <= second[0]


def _worker_whose_port_stops(settings: Settings, listening: socket.socket, *pipes: Any) -> None:
    """A worker (in a forked child) whose serving thread ends at once, as an exception in
    socketserver's loop would end it."""
    workers_module.StorageSCP.serve = lambda *args, **kwargs: None  # type: ignore[method-assign]
    workers_module._die_with_parent = lambda: None
    workers_module.configure_node_logging = lambda options: None
    writer, control = pipes
    limits = SharedLimits.create(limits_for(settings), rows=1)
    workers_module._run_worker(
        settings, [(listening, False)], writer, os.getppid(), limits.for_row(0), control
    )


def test_a_worker_whose_port_stopped_serving_ends_to_be_replaced(tmp_path: Path) -> None:
    settings = Settings(node=NodeOptions(data_dir=tmp_path, min_free_mb=0, stop_timeout_s=2))
    listening = socket.create_server(("127.0.0.1", 0))
    reader, writer = multiprocessing.Pipe(duplex=False)
    ours, control = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_worker_whose_port_stops, args=(settings, listening, writer, control)
    )
    child.start()
    try:
        child.join(30)
        assert child.exitcode == 1  # not 0: the supervisor replaces it either way
    finally:
        if child.is_alive():
            child.kill()
        listening.close()
        for end in (reader, writer, ours, control):
            end.close()
