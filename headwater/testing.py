"""A test kit for code built on Headwater (and for Headwater's own tests).

- :func:`embedded_stack` starts a real, throwaway stack (the embedded broker and Redis,
  plus the services you ask for) in a temporary directory on free ports, and stops and
  wipes it on exit. What it yields, :class:`RunningStack`, hands out the Python client
  already pointed at it.
- :class:`ManualClock` is a clock a test moves by hand, for the components that take a
  ``clock`` (the learner service, serving's holder, the served-lag tracker); its
  :meth:`ManualClock.sleep` is an awaitable sleep that moves it (the agents' retry
  backoff takes a ``sleep``), so no test patches ``asyncio.sleep``.
- In-memory parts for fast unit tests (the real ones are held to the same contract
  suites): :class:`~features.memory_store.MemoryOnlineStore` (the online store),
  :class:`~features.memory_store.MemoryIdWindow` (the duplicate-id window),
  :class:`~streams.events.MemoryLog` (an event source and sink: partitions by offset,
  committed offsets), and :class:`AgentHarness`, which registers the worker's agents
  like a Faust app and feeds them batches of messages.

Example::

    from headwater.testing import embedded_stack

    with embedded_stack(services=("worker", "serve")) as stack:
        with stack.sender() as sender:
            sender.send_clicks([...])
        stack.serving().score("42", ["50"])
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import Settings
from features.memory_store import MemoryIdWindow, MemoryOnlineStore
from headwater.client import EventSender, FeatureReader, ServingClient
from headwater.servers import free_port
from headwater.stack import SERVICES, down, up
from streams.events import MemoryLog

__all__ = ["AgentHarness", "ManualClock", "MemoryIdWindow", "MemoryLog", "MemoryOnlineStore",
           "RunningStack", "embedded_stack"]

log = logging.getLogger(__name__)


class ManualClock:
    """A clock that moves only when told to.

    >>> clock = ManualClock(100.0)
    >>> clock(), clock.advance(2.5), clock()
    (100.0, 102.5, 102.5)
    """

    def __init__(self, start: float = 1_000_000_000.0) -> None:
        self.now = float(start)
        #: what :meth:`sleep` was asked for, in order
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"a clock does not go back: advance({seconds})")
        self.now += seconds
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Sleep on this clock: it moves by ``seconds`` at once (recorded in :attr:`slept`).

        >>> import asyncio
        >>> clock = ManualClock(0.0)
        >>> asyncio.run(clock.sleep(1.5)); clock(), clock.slept
        (1.5, [1.5])
        """
        self.slept.append(seconds)
        self.advance(seconds)


@dataclass
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @property
    def tp(self) -> tuple[str, int]:
        return self.topic, self.partition


@dataclass
class _Event:
    message: _Record


class AgentHarness:
    """Stands in for the Faust app when registering agents (:func:`streams.app.batched_agent`)
    and feeds them in-memory batches, as ``stream.take_events`` would.

    >>> import asyncio
    >>> from streams.app import batched_agent
    >>> from streams.events import MemoryLog
    >>> async def handler(topic, partition, messages):
    ...     return [("out", None, value.upper(), partition) for _, _, value in messages]
    >>> harness, sink = AgentHarness(), MemoryLog()
    >>> batched_agent(harness, "in", 2, handler, 10, 0.01, "upper", sink=sink)
    >>> asyncio.run(harness.feed("upper", [[(1, 0, None, b"a"), (1, 1, None, b"b")]]))
    >>> sink.messages("out", 1)
    [b'A', b'B']
    """

    def __init__(self) -> None:
        #: agent name -> the registered agent function
        self.agents: dict[str, Any] = {}
        #: agent name -> the topic names it consumes
        self.topics: dict[str, tuple[str, ...]] = {}
        #: (topic, partition, offset) of every message a pipelined agent acknowledged, in order
        self.acked: list[tuple[str, int, int]] = []

    def topic(self, *names: str, **_options: Any) -> tuple[str, ...]:
        return names

    def agent(self, topic: tuple[str, ...], name: str):
        def register(fn):
            self.agents[name] = fn
            self.topics[name] = topic
            return fn

        return register

    async def feed(self, name: str, batches: list[list[tuple]]) -> None:
        """Run agent ``name`` over ``batches`` of ``(partition, offset, key, value)`` (the
        agent's first topic) or ``(topic, partition, offset, key, value)``."""
        first = self.topics[name][0]

        acked = self.acked

        class Stream:
            enable_acks = True

            def take_events(self, n: int, within: float):
                async def events():
                    for batch in batches:
                        yield [_Event(_Record(*(m if len(m) == 5 else (first, *m))))
                               for m in batch]

                return events()

            async def events(self):
                """Every message of every batch, one at a time (a pipelined agent)."""
                for batch in batches:
                    for m in batch:
                        yield _Event(_Record(*(m if len(m) == 5 else (first, *m))))
                    await asyncio.sleep(0)

            async def ack(self, event: _Event) -> bool:
                m = event.message
                acked.append((m.topic, m.partition, m.offset))
                return True

        await self.agents[name](Stream())


@dataclass
class RunningStack:
    """Addresses of a running stack and clients for it."""

    settings: Settings
    kafka: str
    redis: str
    http: str

    def sender(self, **options: Any) -> EventSender:
        return EventSender(self.kafka, topic_prefix=self.settings.topic_prefix, **options)

    def serving(self, **options: Any) -> ServingClient:
        token = self.settings.admin_token_value()
        return ServingClient(self.http, admin_token=token, **options)

    def features(self) -> FeatureReader:
        return FeatureReader(self.redis, partitions=self.settings.partitions,
                             features=str(self.settings.features) if self.settings.features else None)


@contextmanager
def embedded_stack(root: str | Path | None = None, *, services: tuple[str, ...] = SERVICES,
                   timeout: float = 120.0, **settings: Any) -> Iterator[RunningStack]:
    """Start a throwaway stack; ``settings`` override :class:`core.settings.Settings` fields.

    State lives under ``root`` (default: a new temporary directory, removed on exit);
    on exit the stack is stopped and its state purged. Defaults suit tests: free ports,
    the hashing content encoder (no model download).
    """
    made = root is None
    base = Path(tempfile.mkdtemp(prefix="headwater-stack-")) if made else Path(root)
    values = {
        "state_dir": base / "state", "model_store": base / "state" / "models",
        "kafka_port": 0, "redis_port": 0, "http_port": free_port(), "worker_port": free_port(),
        "learner_port": free_port(), "content_encoder": "hashing", "kafka": None, "redis": None,
    }
    values.update(settings)
    config = Settings(**values)
    state = up(config, services, timeout=timeout, echo=log.info)
    try:
        yield RunningStack(config, state.kafka, state.redis, state.http)
    finally:
        down(config, echo=log.info, purge=True)
        if made:
            shutil.rmtree(base, ignore_errors=True)
