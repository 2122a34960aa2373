"""Adaptive takes for a pipelined agent: bounded in events, lingering only while messages arrive.

Faust's ``take_events`` counts messages (an envelope of 200 events weighs as one) and,
after every batch, waits a fixed ``within`` for the next one to fill, while the stream
is blocked until the handler is done. :class:`Batcher` is the buffer between an agent's
stream and its handler instead:

* the stream keeps feeding it while a take is handled (up to ``capacity`` events
  buffered, then the stream waits: back-pressure), so under load the next take is
  already there when the handler is free;
* a take holds at most ``max_events`` events (a message's weight is its event count,
  ``weigh``) and ``max_messages`` messages; a message heavier than the bound is a take
  of its own;
* a take starts as soon as one message is buffered and keeps collecting only while
  messages keep arriving: it closes when no message came for ``gap`` seconds and
  ``backlog()`` says none is known to be waiting (the consumer has fetched up to the
  log end), when ``within`` seconds passed since it started, or when it is full. An idle
  stream's lone message waits at most ``gap``, never ``within``; under a backlog a take
  grows to its bounds, for at most ``within_backlog`` seconds, however bursty the
  delivery (the messages wait anyway, and a bigger take costs less per event).

Pure asyncio, no Faust: :func:`streams.app.batched_agent` feeds it from the stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Batcher", "TakePolicy", "envelope_weight"]


def envelope_weight(value: bytes | None) -> int:
    """Events in a click message, counted without decoding it: a JSON array or JSON lines
    counts its ``"event_id"`` keys, anything else is one event (at least 1).

    >>> envelope_weight(b'{"event_id": "a"}'), envelope_weight(b'[{"event_id": "a"}, {"event_id": "b"}]')
    (1, 2)
    >>> envelope_weight(b'{"event_id": "a"}\\n{"event_id": "b"}\\n'), envelope_weight(b"[]"), envelope_weight(None)
    (2, 1, 1)
    """
    if not value:
        return 1
    return max(1, value.count(b'"event_id"'))


@dataclass(frozen=True)
class TakePolicy:
    """How a pipelined agent takes its batches (:class:`Batcher`) and how many taken
    batches may be in flight behind the one being handled (``depth``: their outputs are
    being produced, then their messages acknowledged, in order)."""

    max_events: int
    max_messages: int
    within: float
    gap: float
    depth: int = 1
    within_backlog: float = 0.0
    weigh: Callable[[bytes | None], int] = envelope_weight


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Batcher:
    """A bounded buffer of ``(item, weight)`` that hands out adaptive takes.

    >>> async def demo():
    ...     b = Batcher(max_events=5, max_messages=100, within=1.0, gap=0.01)
    ...     for i, w in enumerate([2, 2, 2, 1]):
    ...         await b.put(i, w)
    ...     b.close()
    ...     return [t async for t in b.takes()]
    >>> asyncio.run(demo())
    [[0, 1], [2, 3]]
    """

    def __init__(self, max_events: int, max_messages: int, within: float, gap: float,
                 capacity: int | None = None, backlog: Callable[[], bool] | None = None,
                 within_backlog: float = 0.0) -> None:
        if max_events < 1 or max_messages < 1:
            raise ValueError("a take must allow at least one event and one message")
        self.max_events = max_events
        self.max_messages = max_messages
        self.within = within
        self.gap = gap
        #: events buffered before :meth:`put` waits (default: two takes' worth)
        self.capacity = capacity if capacity is not None else 2 * max_events
        #: whether more messages are known to be on their way (default: never known)
        self.backlog = backlog or (lambda: False)
        #: seconds a take may keep collecting while ``backlog()`` holds (at least ``within``)
        self.within_backlog = max(within, within_backlog)
        self._items: deque[tuple[Any, int]] = deque()
        self._weight = 0
        self._arrivals = 0
        self._closed = False
        self._failed: BaseException | None = None
        self._waiting: asyncio.Future | None = None
        self._room: asyncio.Future | None = None
        self._filling: asyncio.Future | None = None  # a take collecting: set when it fills

    def __len__(self) -> int:
        return len(self._items)

    @property
    def weight(self) -> int:
        """Events buffered."""
        return self._weight

    async def put(self, item: Any, weight: int) -> None:
        """Buffer one message; waits while ``capacity`` events are buffered. Raises what
        the consumer side failed with (:meth:`fail`)."""
        while self._weight >= self.capacity and self._failed is None:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        if self._failed is not None:
            raise self._failed
        self._items.append((item, weight))
        self._weight += weight
        self._arrivals += 1
        self._wake()
        if self._filling is not None and self._full():
            _resolve(self._filling)

    def close(self) -> None:
        """No more messages: :meth:`take` hands out what is buffered, then None."""
        self._closed = True
        self._wake()
        if self._filling is not None:
            _resolve(self._filling)

    def fail(self, exc: BaseException) -> None:
        """The consumer side failed: the next :meth:`put` raises ``exc``."""
        self._failed = exc
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    def _wake(self) -> None:
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    def _full(self) -> bool:
        return self._weight >= self.max_events or len(self._items) >= self.max_messages

    async def take(self) -> list[Any] | None:
        """The next take (at least one message), or None once closed and empty."""
        loop = asyncio.get_running_loop()
        while not self._items:
            if self._closed:
                return None
            self._waiting = loop.create_future()
            try:
                await self._waiting
            finally:
                self._waiting = None
        start = loop.time()
        deadline = start + self.within
        while not self._full() and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                if deadline < start + self.within_backlog and self.backlog():
                    deadline = start + self.within_backlog  # a backlog: no one waits on us
                    continue
                break
            seen = self._arrivals
            await self._fill_or_wait(loop, min(self.gap, remaining))
            if self._arrivals == seen and not self.backlog():  # nothing came, none waiting
                break
        out: list[Any] = []
        events = 0
        while self._items and len(out) < self.max_messages:
            item, weight = self._items[0]
            if out and events + weight > self.max_events:
                break
            self._items.popleft()
            self._weight -= weight
            events += weight
            out.append(item)
        if self._room is not None and not self._room.done() and self._weight < self.capacity:
            self._room.set_result(None)
        return out

    async def _fill_or_wait(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """Wait ``seconds``, or less if the take fills (or the buffer closes) meanwhile."""
        self._filling = fut = loop.create_future()
        timer = loop.call_later(seconds, _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._filling = None

    async def takes(self):
        """Every take until closed and empty."""
        while (batch := await self.take()) is not None:
            yield batch
