"""Signal handlers that never take a lock: the handler writes the signal's number to a
pipe, and a daemon thread runs the action.

Why: CPython runs a Python-level handler in the main thread between two bytecodes, also
in the middle of ``threading.Event.wait`` while that thread holds the event's
(non-reentrant) lock, and also inside another handler. A handler that calls
``event.set()`` then waits for a lock its own thread holds, forever. Two SIGTERMs a few
microseconds apart (``killpg`` plus a supervisor forwarding the signal) hit that window;
a learner group hung this way on stop. Writing one byte to a pipe takes no Python lock,
so the handler is safe at any point; the action runs in an ordinary thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

Action = Callable[[int], None]


def on_signals(actions: Mapping[int, Action], name: str = "signals") -> threading.Thread:
    """Run ``actions[signum](signum)`` in a daemon thread whenever ``signum`` arrives.

    Call from the main thread (``signal.signal`` requires it). An action that raises is
    logged and the next signal is still handled. Returns the dispatching thread.

    >>> import os, signal, threading
    >>> got = threading.Event()
    >>> _ = on_signals({signal.SIGUSR1: lambda signum: got.set()}, name="doctest-signals")
    >>> os.kill(os.getpid(), signal.SIGUSR1)
    >>> got.wait(5)
    True
    >>> _ = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    """
    if not actions:
        raise ValueError("on_signals needs at least one signal to handle")
    table = dict(actions)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def _handler(signum: int, _frame: object) -> None:
        try:
            os.write(write_fd, bytes((signum,)))
        except BlockingIOError:
            pass  # the pipe is full: thousands of signals already wait to be handled

    def _dispatch() -> None:
        while True:
            for signum in os.read(read_fd, 256):
                try:
                    table[signum](signum)
                except Exception:  # noqa: BLE001 - one failed action must not end handling
                    log.exception("handling signal %d failed", signum)

    thread = threading.Thread(target=_dispatch, name=name, daemon=True)
    thread.start()
    for signum in table:
        signal.signal(signum, _handler)
    return thread
