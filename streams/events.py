"""The event source and sink of the worker's paths, as protocols, and their implementations.

The agents consume batches from Faust; besides, a path reads its own input back by
offset (a Redis that lost writes is caught up from the log, a REWIND is told from the
log's end, an assignment is checked against the group's committed offsets) and produces
its outputs. :class:`EventLog` is that source, :class:`EventSink` that sink:

- :class:`KafkaLog` reads the broker through the project's client factory
  (:mod:`core.kafka`, so the security settings apply), without joining a group;
- the worker's sink is Faust's producer (:func:`streams.app.send_all`);
- :class:`MemoryLog` is both in memory, for unit tests (``headwater.testing`` hands it
  out): partitions as lists, offsets from 0, committed offsets per group.

``tests/streams/test_event_contract.py`` runs one suite against the Kafka log (the real
broker) and the memory log.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from kafka import TopicPartition

from core import kafka as kafka_clients
from streams.topics import log_ends

__all__ = ["EventLog", "EventSink", "KafkaLog", "MemoryLog", "Message", "Output"]

#: One consumed message: (offset, key, value).
Message = tuple[int, bytes | None, bytes | None]
#: One produced record: (topic, key, value, partition or None for the key's).
Output = tuple[str, bytes | None, bytes, int | None]


@runtime_checkable
class EventLog(Protocol):
    """Partitioned, offset-addressed input, read back outside the consumer group."""

    def read_range(self, topic: str, partition: int, start: int, stop: int) -> list[Message]:
        """The messages at offsets ``[start, stop)`` of one partition, in offset order;
        ``TimeoutError`` when they cannot all be read."""
        ...

    def log_end(self, topic: str, partition: int) -> int:
        """The offset the partition's next message gets (exact, never a lower bound)."""
        ...

    def committed(self, group: str, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """The group's committed offset per partition (never committed: 0)."""
        ...


@runtime_checkable
class EventSink(Protocol):
    """Where a path's outputs go; returns once every record is accepted (else raises)."""

    async def send(self, outputs: list[Output]) -> None: ...


class KafkaLog:
    """:class:`EventLog` over the broker at ``bootstrap`` (kafka-python, blocking calls:
    run them in an executor from async code)."""

    def __init__(self, bootstrap: str, timeout: float = 60.0) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout

    def read_range(self, topic: str, partition: int, start: int, stop: int) -> list[Message]:
        consumer = kafka_clients.consumer(self.bootstrap, enable_auto_commit=False,
                                          fetch_max_wait_ms=50, max_partition_fetch_bytes=16 << 20)
        try:
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            consumer.seek(tp, start)
            out: list[Message] = []
            deadline = time.monotonic() + self.timeout
            while consumer.position(tp) < stop:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not re-read {topic}[{partition}] {start}..{stop}")
                for records in consumer.poll(timeout_ms=200).values():
                    out.extend((r.offset, r.key, r.value) for r in records if r.offset < stop)
            return out
        finally:
            consumer.close()

    def log_end(self, topic: str, partition: int) -> int:
        return log_ends(self.bootstrap, topic, [partition])[partition]

    def committed(self, group: str, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        consumer = kafka_clients.consumer(self.bootstrap, group_id=group, enable_auto_commit=False)
        try:
            return {p: int(consumer.committed(TopicPartition(topic, p)) or 0) for p in partitions}
        finally:
            consumer.close()


class MemoryLog:
    """An in-memory :class:`EventLog` and :class:`EventSink` (for tests); a record sent
    without a partition goes to partition 0.

    >>> log = MemoryLog()
    >>> log.append("clicks", 0, b"a"), log.append("clicks", 0, b"b", key=b"k")
    (0, 1)
    >>> log.read_range("clicks", 0, 1, 2), log.log_end("clicks", 0), log.log_end("clicks", 3)
    ([(1, b'k', b'b')], 2, 0)
    """

    def __init__(self) -> None:
        self.partitions: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = defaultdict(list)
        self.offsets: dict[tuple[str, str, int], int] = {}

    def append(self, topic: str, partition: int, value: bytes | None, key: bytes | None = None) -> int:
        """Add one message; returns its offset."""
        log = self.partitions[(topic, partition)]
        log.append((key, value))
        return len(log) - 1

    def messages(self, topic: str, partition: int | None = None) -> list[bytes | None]:
        """The values in a partition (all partitions, in partition order, for ``None``)."""
        keys = sorted(k for k in self.partitions if k[0] == topic and partition in (None, k[1]))
        return [v for k in keys for _, v in self.partitions[k]]

    def commit(self, group: str, topic: str, partition: int, offset: int) -> None:
        self.offsets[(group, topic, partition)] = int(offset)

    def read_range(self, topic: str, partition: int, start: int, stop: int) -> list[Message]:
        log = self.partitions.get((topic, partition), [])
        if stop > len(log):
            raise TimeoutError(f"could not re-read {topic}[{partition}] {start}..{stop}: "
                               f"the log ends at {len(log)}")
        return [(o, *log[o]) for o in range(max(start, 0), stop)]

    def log_end(self, topic: str, partition: int) -> int:
        return len(self.partitions.get((topic, partition), []))

    def committed(self, group: str, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        return {p: self.offsets.get((group, topic, p), 0) for p in partitions}

    async def send(self, outputs: list[Output]) -> None:
        for topic, key, value, partition in outputs:
            self.append(topic, 0 if partition is None else partition, value, key=key)
