"""Server-assisted client-side caching: Redis says which keys changed (``CLIENT TRACKING``).

One listener connection per process subscribes to ``__redis__:invalidate``. Every data
connection of a :class:`core.redis_client.RoundTrips` that has a tracker turns tracking
on with ``REDIRECT <listener id>``. Redis then remembers each key those connections read
(inside scripts too, and keys that do not exist yet). When any client changes or deletes
one, when it expires, or on ``FLUSHALL``, Redis sends the key names to the listener,
once per read: a key is tracked again only when it is read again. Redis 6.0 and later;
6.2 and 7.0 are the servers the tests run.

**Lifetime and failure.** ``generation`` names one listener connection.

- While no listener is subscribed (``live`` is False), nothing may be cached: a key read
  then is not tracked for this process.
- When the listener's connection drops (a Redis restart, the network), every subscriber
  is told to forget everything (``callback(None)``). A new listener connects after
  ``retry_seconds`` with a new generation.
- A data connection opened under an older generation is closed before its next use:
  its tracking redirects to a client that is gone.
- A server that does not know the listener's id (it restarted, and the listener has not
  seen its connection drop yet) is no refusal: the listener is replaced.
- A server that refuses tracking (an ACL without ``CLIENT``, an old server) sets
  ``error``; the listener stops for good and callers read Redis as before.

**Ordering.** Redis queues a key's invalidation while it runs the write, and sends it in
the same pass of its event loop in which it answers the writer: on one host the two are
microseconds apart, either way round. The listener is an asyncio
:class:`~asyncio.Protocol`, so an invalidation is applied in the event-loop callback that
reads it, before any request task woken in the same loop turn runs. A request that reaches
serving after the invalidation reached its socket never reads the old value; one that
arrives in the microseconds between can.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis

__all__ = ["CHANNEL", "Invalidations"]

log = logging.getLogger(__name__)

#: the channel Redis publishes invalidations on for ``REDIRECT`` clients (RESP2)
CHANNEL = b"__redis__:invalidate"


class _Listener(asyncio.Protocol):
    """One subscribed connection: command replies to ``pending``, messages to ``owner``."""

    def __init__(self, owner: Invalidations) -> None:
        self.owner = owner
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future] = deque()
        self.subscribed = False
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, *cmd: Any) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        assert self.transport is not None
        self.transport.write(hiredis.pack_command(cmd))
        return fut

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                log.warning("invalid reply on Redis's invalidation channel: %s", exc)
                assert self.transport is not None
                self.transport.close()
                return
            if reply is False:
                return
            if (self.subscribed and isinstance(reply, list) and len(reply) == 3
                    and reply[0] == b"message"):
                self.owner.invalidate(reply[2])
            elif self.pending:
                fut = self.pending.popleft()
                if not fut.done():
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self.pending:
            if not fut.done():
                fut.set_exception(ConnectionError("Redis closed the invalidation channel"))
        self.pending.clear()
        if not self.lost.done():
            self.lost.set_result(exc)


class Invalidations:
    """The invalidation listener of one process, shared by its caches and connections.

    ``subscribe(callback)``: ``callback(keys)`` gets the changed keys' names (``bytes``)
    or ``None`` ("forget everything": the listener was lost, or ``FLUSHALL``).
    :meth:`start` is called by the first tracked round trip, on the running loop.
    """

    def __init__(self, host: str | None = None, port: int = 6379, *, path: str | None = None,
                 username: str | None = None, password: str | None = None,
                 connect_timeout: float = 5.0, retry_seconds: float = 0.5) -> None:
        self.host, self.port, self.path = host, port, path
        self.username, self.password = username, password
        self.connect_timeout = connect_timeout
        self.retry_seconds = retry_seconds
        #: the subscribed listener's generation (0 before the first); see ``live``
        self.generation = 0
        #: the listener's ``CLIENT ID`` while it is subscribed, else None
        self.client_id: int | None = None
        #: why the server refused tracking (then nothing is ever cached), else None
        self.error: str | None = None
        #: invalidation messages and keys received, and times every cache was reset
        self.messages = 0
        self.keys = 0
        self.resets = 0
        #: messages on the channel that were not invalidations (a ``PUBLISH`` to it)
        self.other = 0
        self._subscribers: list[Callable[[list[bytes] | None], None]] = []
        self._task: asyncio.Task | None = None
        self._listener: _Listener | None = None

    @property
    def live(self) -> bool:
        """True while a listener is subscribed: keys read now are tracked."""
        return self.client_id is not None

    def subscribe(self, callback: Callable[[list[bytes] | None], None]) -> None:
        self._subscribers.append(callback)

    def start(self) -> None:
        """Connect the listener in the background (again after a loss); idempotent."""
        if self._task is None and self.error is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def refuse(self, reason: str) -> None:
        """The server refused ``CLIENT TRACKING``: stop, and cache nothing from now on."""
        if self.error is None:
            log.warning("Redis refused client tracking (%s): serving reads every feature "
                        "from Redis", reason)
        self.error = reason
        self.close()

    def redirect_failed(self) -> None:
        """A data connection could not redirect to this listener: the server does not know
        its id (Redis restarted and the listener has not seen its connection drop yet).
        Not a refusal: forget everything and connect a new listener."""
        self._drop()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._drop()

    def _drop(self) -> None:
        if self._listener is not None and self._listener.transport is not None:
            self._listener.transport.close()
        self._listener = None
        if self.client_id is not None:
            self.client_id = None
            self.invalidate(None)

    def invalidate(self, keys: Any) -> None:
        """Tell every subscriber: ``keys`` changed (``None``: anything may have)."""
        if keys is None:
            self.resets += 1
        elif isinstance(keys, list):
            self.messages += 1
            self.keys += len(keys)
        else:  # someone PUBLISHed on the channel (tests do, as a barrier): not keys
            self.other += 1
            return
        for callback in self._subscribers:
            callback(keys)

    async def _run(self) -> None:
        failing = False  # logged once per outage, not at every retry
        while True:
            try:
                await self._listen()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect; readers go to Redis meanwhile
                if not failing:
                    log.info("Redis invalidation channel down (%r); retrying every %.1f s, "
                             "features are read from Redis meanwhile", exc, self.retry_seconds)
                failing = True
            self._drop()
            await asyncio.sleep(self.retry_seconds)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        opening = (loop.create_unix_connection(lambda: _Listener(self), self.path) if self.path
                   else loop.create_connection(lambda: _Listener(self), self.host, self.port))
        _, listener = await asyncio.wait_for(opening, self.connect_timeout)
        self._listener = listener
        replies = []
        if self.password is not None:
            replies.append(listener.send("AUTH", self.username or "default", self.password))
        replies.append(listener.send("CLIENT", "ID"))
        replies.append(listener.send("SUBSCRIBE", CHANNEL))
        listener.subscribed = True  # every reply after SUBSCRIBE's own is a message
        answers = await asyncio.wait_for(asyncio.gather(*replies), self.connect_timeout)
        for answer in answers:
            if isinstance(answer, Exception):  # an error reply: retrying will not help
                self.refuse(str(answer))
                return
        self.generation += 1
        self.client_id = int(answers[-2])
        await listener.lost
