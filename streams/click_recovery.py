"""The click path's partitions: who holds which, which are stopped, and catching the
online store up with the log when it lost writes.

**The store's offsets are the truth** (as in Kafka Streams and Flink checkpoints), and
they are checked against what this worker knows was applied: every batch's fenced write
is refused when the recorded next offset is behind this worker's own last write (or,
first after assignment, behind the batch's first offset), and :meth:`GapRecovery.verify`
checks a partition without waiting for its next batch (the worker runs it for every
assigned partition on assignment and after a Redis restart or reconnect). Either way
the missing messages are read back from the log (:class:`streams.events.EventLog`) and
applied first, so a store that lost writes is caught up, never silently skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from streams.events import EventLog, EventSink, Message, Output
from streams.metrics import WorkerMetrics

__all__ = ["GapRecovery", "Partitions", "rewind_reason"]

log = logging.getLogger(__name__)


def rewind_reason(topic: str, partition: int, recorded: int, end: int) -> str:
    """Why a partition stops when the store records more than the log holds."""
    return (f"{topic}[{partition}]: REWIND: Redis records offsets up to {recorded} "
            f"as applied, but the broker's log ends at {end}: the log was reset while "
            f"Redis kept its state. Run `headwater reset` (wipes Redis, the model store "
            f"and the broker's log) and replay.")


class Partitions:
    """Per click partition: its lock, the next offset at this worker's last write, whether
    it is assigned here, and whether it is stopped (a REWIND; its messages are refused).

    Batches of different partitions may run concurrently; one partition's batches,
    checks and repairs run one at a time (:meth:`lock`).
    """

    def __init__(self, topic: str, metrics: WorkerMetrics, state,
                 pause: Callable[[int], None] | None = None) -> None:
        self.topic = topic
        self.metrics = metrics
        self.state = state
        #: stops fetching a partition (the worker's: pauses the Faust consumer)
        self.pause = pause
        #: partition -> the next offset the store recorded at this worker's last write
        self.next: dict[int, int] = {}
        self.assigned: set[int] = set()
        #: partition -> why it is stopped
        self.stopped: dict[int, str] = {}
        #: the store failed since it last verified cleanly (outage): verify everything
        self.store_lost = False
        self._locks: dict[int, asyncio.Lock] = {}

    def lock(self, partition: int) -> asyncio.Lock:
        return self._locks.setdefault(partition, asyncio.Lock())

    def on_assigned(self, partitions: Iterable[int]) -> None:
        partitions = set(partitions)
        self.assigned.update(partitions)
        for p in partitions & set(self.stopped):
            if self.pause is not None:
                self.pause(p)

    def on_revoked(self, partitions: Iterable[int]) -> None:
        """Another worker may write these from now on: forget what we knew of them."""
        for p in partitions:
            self.assigned.discard(p)
            self.next.pop(p, None)

    def stop(self, partition: int, reason: str) -> None:
        """Stop one partition (REWIND): its messages are refused, counted, never applied."""
        if partition not in self.stopped:
            log.error("stopping %s[%d]: %s", self.topic, partition, reason)
            self.metrics.rewinds.labels(self.topic, str(partition)).inc()
            self.metrics.stopped.labels(self.topic, str(partition)).set(1)
        self.stopped[partition] = reason
        self.state.last_error = reason
        if self.pause is not None:
            self.pause(partition)

    def lost_store(self) -> None:
        """A store command failed: report it, and verify every partition once it answers."""
        self.state.redis_ok = False
        self.store_lost = True


#: Re-applies messages read back from the log: (partition, messages, first offset) → outputs.
Reapply = Callable[[int, list[Message], int], Awaitable[list[Output]]]


class GapRecovery:
    """Finds what the store lost and has it re-applied from the log.

    ``store`` needs ``next_offsets(partition)`` and ``instance_id()``; ``reapply`` decodes
    and applies read-back messages (without dead-lettering them again); ``sink`` takes a
    repair's outputs while the partition is still locked, so they go out before its
    next batch.
    """

    def __init__(self, partitions: Partitions, store, events: EventLog, reapply: Reapply,
                 sink: EventSink | None = None) -> None:
        self.partitions = partitions
        self.topic = partitions.topic
        self.store = store
        self.events = events
        self.reapply = reapply
        self.sink = sink
        self._instance: str | None = None

    async def read_gap(self, partition: int, start: int, stop: int) -> list[Message]:
        log.warning("Redis state for %s[%d] ends at offset %d, %d was applied: re-reading the gap",
                    self.topic, partition, start, stop)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.events.read_range, self.topic, partition,
                                          start, stop)

    async def verify(self, partition: int, upto: int | None = None,
                     check_end: bool = False) -> list[Output]:
        """Check one partition now: re-read and apply what the store lost below ``upto``.

        ``upto`` defaults to this worker's own last write; on assignment the caller
        passes the group's committed offset. With ``check_end``, the store recording
        more than the log holds stops the partition (REWIND); the log end is asked after
        the store, under the partition's lock, so this worker's own progress cannot pass
        it. Returns the repair's outputs, or sends them through the sink while the
        partition is still locked.
        """
        parts = self.partitions
        async with parts.lock(partition):
            upto = parts.next.get(partition) if upto is None else upto
            if partition in parts.stopped or not (upto or check_end):
                return []
            recorded = (await self.store.next_offsets(partition)).get(self.topic, 0)
            end = recorded
            if check_end and recorded:
                end = await asyncio.get_running_loop().run_in_executor(
                    None, self.events.log_end, self.topic, partition)
            if recorded > end:
                parts.stop(partition, rewind_reason(self.topic, partition, recorded, end))
                return []
            if not upto or recorded >= upto:
                return []
            gap = await self.read_gap(partition, recorded, upto)
            outputs = await self.reapply(partition, gap, recorded)
            if self.sink is not None and outputs:
                await self.sink.send(outputs)
                return []
            return outputs

    async def verify_all(self, committed: dict[int, int] | None = None) -> None:
        """:meth:`verify` every assigned partition now (``committed``: offsets to check to)."""
        committed = committed or {}
        await asyncio.gather(*(self.verify(p, committed.get(p), check_end=True)
                               for p in sorted(self.partitions.assigned)))

    async def verify_assigned(self, partitions: Iterable[int], group: str) -> None:
        """On assignment: the store must have applied at least the group's committed
        offsets, and nothing beyond the log's end (else the partition stops: a REWIND)."""
        loop = asyncio.get_running_loop()
        committed = await loop.run_in_executor(None, self.events.committed, group, self.topic,
                                               sorted(partitions))
        await asyncio.gather(*(self.verify(p, c, check_end=True) for p, c in committed.items()))

    async def check_store(self) -> None:
        """Run periodically: after a store restart or an outage, verify every partition now.

        A restart shows as a new instance id; an outage as a failed call here or in a
        batch. Until every assigned partition verified cleanly, the next call tries again.
        """
        parts = self.partitions
        try:
            instance = await self.store.instance_id()
        except Exception:  # noqa: BLE001 - an outage: verify once the store answers again
            parts.store_lost = True
            return
        if parts.store_lost or self._instance not in (None, instance):
            log.warning("Redis restarted or came back: verifying every assigned %s partition",
                        self.topic)
            parts.store_lost = True
            self._instance = instance
            await self.verify_all()
            parts.store_lost = False
        self._instance = instance
