"""Connections spread evenly over the serving workers that share one listening socket.

Every worker of ``headwater serve --workers N`` waits on the same kernel accept queue.
Left to asyncio, the worker that wakes first accepts everything queued at that moment
(its accept loop takes up to the backlog per wake-up). Clients keep their connections
open (keep-alive), so a burst of connections stays where it landed: measured with 16
clients connecting at once to two workers, one worker held 14 to 16 of them and the other
sat idle (BENCHMARKS.md, "Session 20").

Here each worker accepts one connection per wake-up and first looks at a small shared
board (:class:`LoadBoard`, one slot per worker process, written only by its owner) of
how many connections each worker holds. A worker that holds more than some other
accepting worker leaves the connection in the queue for that one, for at most
``max_defer`` seconds; after that it accepts anyway, so a worker that is busy, stuck or
dead delays a new connection by at most that long and never refuses it. A slot of
:data:`CLOSED` is a worker that does not accept (starting, draining or gone): it is
never waited for.

Lifetime: the board lives as long as the supervisor (an anonymous shared file, handed
to each worker by descriptor); a worker's slot holds its count while it accepts and
:data:`CLOSED` otherwise. The counts are advisory: a stale count can only make one
connection land on the busier worker or wait up to ``max_defer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

__all__ = ["BOARD_ENV", "CLOSED", "BalancedAcceptor", "LoadBoard", "board_from_env"]

log = logging.getLogger(__name__)

#: a slot's value while its worker does not accept connections
CLOSED = -1
#: how a supervisor hands a worker its board and slot: ``fd:slots:slot``
BOARD_ENV = "HEADWATER_SERVE_LOAD_BOARD"


class LoadBoard:
    """``slots`` signed 64-bit counters in memory shared between processes.

    >>> board = LoadBoard.create(3)
    >>> board.set(1, 4)
    >>> board.values()
    [-1, 4, -1]
    >>> twin = LoadBoard.attach(board.fileno(), 3)  # as a worker process sees it
    >>> twin.set(2, 1)
    >>> board.fewest_besides(1)  # the least loaded other accepting worker
    1
    >>> board.fewest_besides(2)
    4
    >>> board.close(); twin.close()
    """

    def __init__(self, fd: int, slots: int, *, owner: bool) -> None:
        if slots < 1:
            raise ValueError(f"a load board needs at least one slot, got {slots}")
        self.slots = slots
        self._fd = fd
        self._owner = owner
        self._map = mmap.mmap(fd, 8 * slots)
        self._view = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, slots: int) -> LoadBoard:
        """A new board, every slot :data:`CLOSED`, on an inheritable anonymous file."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("headwater-serve-load", 0)
        else:  # pragma: no cover - not Linux
            fd = os.dup(tempfile.TemporaryFile().fileno())
        os.ftruncate(fd, 8 * slots)
        os.set_inheritable(fd, True)
        board = cls(fd, slots, owner=True)
        for i in range(slots):
            board.set(i, CLOSED)
        return board

    @classmethod
    def attach(cls, fd: int, slots: int) -> LoadBoard:
        """The board a supervisor created, from the descriptor it handed down."""
        return cls(fd, slots, owner=False)

    def fileno(self) -> int:
        return self._fd

    def set(self, slot: int, value: int) -> None:
        self._view[slot] = value

    def values(self) -> list[int]:
        return self._view.tolist()

    def fewest_besides(self, slot: int) -> int | None:
        """The smallest count among the other accepting slots (None: no other accepts)."""
        others = [v for i, v in enumerate(self._view.tolist()) if i != slot and v != CLOSED]
        return min(others) if others else None

    def close(self) -> None:
        self._view.release()
        self._map.close()
        if self._owner:
            os.close(self._fd)


class BalancedAcceptor:
    """Accepts from a shared listening socket one connection at a time, deferring to a
    worker that holds fewer connections (see the module docstring).

    ``protocol_factory`` is what ``loop.create_server`` would take (an aiohttp
    ``web.Server``); ``open_connections`` says how many connections that server holds
    now (the acceptor adds the ones it accepted that are still attaching).
    """

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        open_connections: Callable[[], int],
        board: LoadBoard,
        slot: int,
        *,
        max_defer: float = 0.02,
        recheck: float = 0.002,
        refresh: float = 0.1,
    ) -> None:
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.open_connections = open_connections
        self.board = board
        self.slot = slot
        self.max_defer = max_defer
        self.recheck = recheck
        self.refresh = refresh
        self.accepted = 0
        #: wake-ups that left the queued connection to a less loaded worker
        self.deferred = 0
        #: connections accepted only because ``max_defer`` ran out
        self.forced = 0
        self._attaching: set[asyncio.Task] = set()
        self._pending = 0  # accepted, not yet among open_connections()
        self._waiting_since: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._recheck_timer: asyncio.TimerHandle | None = None
        self._reading = False
        self._open = False

    # -- life --------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._open = True
        self._watch()
        self._refresh()

    async def stop(self) -> None:
        """Stop accepting (the slot turns :data:`CLOSED`, queued connections stay for the
        other workers) and wait until the connections already accepted have attached."""
        self._open = False
        self._unwatch()
        for timer in (self._refresh_timer, self._recheck_timer):
            if timer is not None:
                timer.cancel()
        self.board.set(self.slot, CLOSED)
        if self._attaching:
            await asyncio.gather(*self._attaching, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "deferred": self.deferred, "forced": self.forced,
                "open": self._held(), "board": self.board.values()}

    # -- accepting ---------------------------------------------------------------------
    def _held(self) -> int:
        return self.open_connections() + self._pending

    def _publish(self) -> int:
        held = self._held()
        if self._open:
            self.board.set(self.slot, held)
        return held

    def _refresh(self) -> None:
        """Keep this worker's count fresh as its clients hang up."""
        if self._open:
            self._publish()
            assert self._loop is not None
            self._refresh_timer = self._loop.call_later(self.refresh, self._refresh)

    def _watch(self) -> None:
        if self._open and not self._reading:
            assert self._loop is not None
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def _unwatch(self) -> None:
        if self._reading:
            assert self._loop is not None
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _pause(self, seconds: float) -> None:
        """Stop watching the socket (it stays readable while a connection waits, so
        watching would spin) and decide again in ``seconds``."""
        self._unwatch()
        assert self._loop is not None
        self._recheck_timer = self._loop.call_later(seconds, self._recheck)

    def _recheck(self) -> None:
        self._recheck_timer = None
        if self._open:
            self._watch()
            # decide now, not on the next wake-up: if another worker took the connection
            # meanwhile the accept below finds the queue empty and the wait ends
            self._on_readable()

    def _on_readable(self) -> None:
        held = self._publish()
        fewest = self.board.fewest_besides(self.slot)
        if fewest is not None and held > fewest:
            now = time.monotonic()
            if self._waiting_since is None:
                self._waiting_since = now
            if now - self._waiting_since < self.max_defer:
                self.deferred += 1
                self._pause(self.recheck)
                return
            self.forced += 1
        try:
            conn, _addr = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            self._waiting_since = None  # nothing queued (another worker took it)
            return
        except OSError as exc:  # e.g. EMFILE: keep serving what is open, try again later
            log.warning("accept failed: %s", exc)
            self._pause(0.1)
            return
        self._waiting_since = None
        self.accepted += 1
        self._pending += 1
        conn.setblocking(False)
        assert self._loop is not None
        task = self._loop.create_task(self._attach(conn))
        self._attaching.add(task)
        task.add_done_callback(self._attaching.discard)
        self._publish()

    async def _attach(self, conn: socket.socket) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(self.protocol_factory, conn)
        except Exception as exc:  # the client may already have gone
            log.debug("accepted connection could not attach: %s", exc)
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            # connection_made has run, so open_connections() counts it now (between the
            # two, a count published by another accept counted it twice: mend that)
            self._pending -= 1
            self._publish()


def board_from_env(env: dict[str, str] | None = None) -> tuple[LoadBoard, int] | None:
    """The board and slot a supervisor handed this worker (None: not a balanced worker)."""
    env = os.environ if env is None else env
    spec = env.get(BOARD_ENV)
    if not spec:
        return None
    try:
        fd, slots, slot = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"{BOARD_ENV} must be 'fd:slots:slot', got {spec!r}") from None
    return LoadBoard.attach(fd, slots), slot
