"""The node's DIMSE requests as a client: each one gets its own answer.

pynetdicom 3.0's ``Association.send_*`` (``send_c_store``, ``send_c_echo``, ``send_n_action``,
...) pause the requestor's reactor thread by clearing ``_reactor_checkpoint`` and go on as
soon as ``_is_paused`` reads True. The reactor sets ``_is_paused`` True before it waits on
the checkpoint and False only once awake again, so right after the previous ``send_*`` set
the checkpoint, a reactor thread not yet scheduled still reads as paused: the request goes
out, the reactor then takes the answer off the DIMSE queue itself ("Received unexpected
C-STORE service message") and ``send_*`` waits out its DIMSE timeout with no status
(pynetdicom issue #875). For the node that is a delivery retried after a timeout: slower, and
the instance sent twice. :func:`parked` closes the window before every ``send_*``.

The pynetdicom internals relied on (``_reactor_checkpoint``, the reactor's wait on it, the
``send_*`` pause) are pinned by tests/unit/test_dimse_client.py.
"""

from __future__ import annotations

import threading
import time
from typing import TypeVar

from pynetdicom.association import Association

PARK_DEADLINE_S = 5.0  # the reactor waits again within a loop (~1 ms); this only bounds it
_POLL_S = 0.0001  # as pynetdicom's own wait for ``_is_paused``

A = TypeVar("A", bound=Association)


def parked(assoc: A, deadline_s: float = PARK_DEADLINE_S) -> A:
    """``assoc`` once its reactor thread really waits on its checkpoint, so that the next
    ``send_*`` gets its answer rather than the reactor.

    Clears the checkpoint (as ``send_*`` does) and waits until the reactor thread is seen
    waiting on it: a waiter on the event's condition, not the ``_is_paused`` flag that lags
    behind. Never hangs: returns at once when the association's reactor is gone or is the
    caller (a handler on its own association), and after ``deadline_s`` whatever happened
    (``send_*`` then runs as pynetdicom alone would).
    """
    if threading.current_thread() is assoc:
        return assoc
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
    if waiters is None:  # not CPython's Event: nothing to look at, pynetdicom's own check only
        return assoc
    deadline = time.monotonic() + deadline_s
    while not waiters and assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    return assoc
