"""The pynetdicom and threading internals :func:`pacs_node.dimse_client.parked` relies on,
pinned so that an upgrade that changes them fails here first."""

from __future__ import annotations

import hashlib
import inspect
import threading
import time

import pytest
from pynetdicom import association

Association = association.Association

# The reactor waits on ``_reactor_checkpoint`` with ``_is_paused`` set around the wait; each
# ``send_*`` clears the checkpoint, waits for ``_is_paused`` and sets it again once answered.
PINNED = {
    "Association._run_reactor": (Association._run_reactor, "f28838c5559e462a"),
    "Association.send_c_echo": (Association.send_c_echo, "664d0e9b0ab20c53"),
    "Association.send_c_store": (Association.send_c_store, "fa5a8127f349f8e7"),
    "Association.send_n_action": (Association.send_n_action, "fd0ab80035a52546"),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_pynetdicom_internals_are_unchanged(name: str) -> None:
    function, expected = PINNED[name]
    source = inspect.getsource(inspect.unwrap(function))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == expected, f"pynetdicom's {name} changed: re-check pacs_node/dimse_client.py"


def test_a_thread_waiting_on_an_event_is_seen_among_its_condition_waiters() -> None:
    """``parked`` reads ``Event._cond._waiters``: a waiting thread is there, and no longer
    once the event is set (the reactor woken, until it waits again)."""
    event = threading.Event()
    waiters = event._cond._waiters  # type: ignore[attr-defined]
    assert not waiters
    thread = threading.Thread(target=event.wait, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not waiters and time.monotonic() < deadline:
        time.sleep(0.001)
    assert waiters
    event.set()
    assert not waiters
    thread.join(5)
    assert not thread.is_alive()
