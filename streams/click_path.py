"""The click path of the worker: events → counters in Redis → point-in-time rows → Arrow.

Per partition batch: decode and validate (rejects to ``dead-letter``), apply the batch
to the counters in one Lua call that also returns every event's features as they were
before it, build rows with the shared row builder, and produce one Arrow IPC batch to
``train-batches`` carrying the source partition and offset range.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import numpy as np
from kafka import TopicPartition

from core import kafka as kafka_clients
from core.settings import Settings
from features.defaults import row_builder as make_row_builder
from features.event_ids import EventIdWindow
from features.rows import RowBuilder
from features.store import OnlineStore
from features.store_apply import GapError, RewindError
from learner.batch import encode_batch
from streams.app import Message, Output
from streams.deadletter import dead_letter, reason_kind
from streams.metrics import WorkerMetrics
from streams.schemas import ClickEvent, click_columns, decode_clicks
from streams.topics import log_ends

log = logging.getLogger(__name__)


def events_to_columns(events: list[ClickEvent], offsets: list[int], subs: list[int]) -> dict:
    """Columnar view of decoded click events (the shape ``OnlineStore.apply_batch`` takes)."""
    cols = click_columns(events)
    cols["label"] = cols["label"].astype(np.int8)
    cols["offset"] = np.asarray(offsets, np.int64)
    cols["sub"] = np.asarray(subs, np.int32)
    return cols


def _concat(a, b):
    return np.concatenate([a, b]) if isinstance(a, np.ndarray) else list(a) + list(b)


def read_range(bootstrap: str, topic: str, partition: int, start: int, stop: int) -> list[Message]:
    """Messages ``[start, stop)`` of one partition, read without a consumer group."""
    consumer = kafka_clients.consumer(bootstrap, enable_auto_commit=False,
                             fetch_max_wait_ms=50, max_partition_fetch_bytes=16 << 20)
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        out: list[Message] = []
        deadline = time.monotonic() + 60
        while consumer.position(tp) < stop:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not re-read {topic}[{partition}] {start}..{stop}")
            for records in consumer.poll(timeout_ms=200).values():
                out.extend((r.offset, r.key, r.value) for r in records if r.offset < stop)
        return out
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str, partitions) -> dict[int, int]:
    """The consumer group's committed offset per partition (never committed: 0)."""
    consumer = kafka_clients.consumer(bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: int(consumer.committed(TopicPartition(topic, p)) or 0) for p in partitions}
    finally:
        consumer.close()


class ClickHandler:
    """The click agent's domain step for one partition's batch.

    Batches of different partitions may run concurrently (``concurrent_partitions``):
    each touches only its own shard's state, and its writes are fenced.

    **Redis's offsets are the truth** (as in Kafka Streams and Flink checkpoints), and
    they are checked against what this worker knows was applied: every batch's fenced
    write is refused when the recorded next offset is behind this worker's own last
    write (or, first after assignment, behind the batch's first offset), and
    :meth:`verify` checks a partition without waiting for its next batch (the worker
    runs it for every assigned partition on assignment and after a Redis restart or
    reconnect). Either way the missing messages are read back from Kafka and applied
    first, so a Redis that lost writes is caught up, never silently skipped.
    """

    concurrent_partitions = True

    def __init__(self, settings: Settings, client, metrics: WorkerMetrics, state,
                 bootstrap: str, builder: RowBuilder | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.topic = self.topics["clicks"]
        self.metrics = metrics
        self.state = state
        self.builder = builder or make_row_builder(settings)
        self.store = OnlineStore(client, partitions=settings.partitions,
                                 counters=self.builder.config.counters, registry=metrics.registry,
                                 pit_ties=settings.pit_ties, pit_history=settings.pit_history)
        self.bootstrap = bootstrap
        #: duplicate event ids, in Redis: refused across restarts and gap re-reads
        self.recent = EventIdWindow(client, settings.duplicate_window)
        #: partition -> the next offset Redis recorded at this worker's last write
        self._next: dict[int, int] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self.assigned: set[int] = set()
        #: produces a repair's outputs (set by the worker); without it they are returned
        self.send = None
        #: partition -> why it is stopped (a REWIND); its messages are refused
        self.stopped: dict[int, str] = {}
        #: pauses fetching a partition (set by the worker)
        self.pause = None
        #: called with each applied batch's columns (QARM pair mining; set by the worker)
        self.on_clicks = None
        self._redis_run_id: str | None = None
        self._redis_lost = False

    def _lock(self, partition: int) -> asyncio.Lock:
        return self._locks.setdefault(partition, asyncio.Lock())

    def on_assigned(self, partitions) -> None:
        self.assigned.update(partitions)
        for p in set(partitions) & set(self.stopped):
            if self.pause is not None:
                self.pause(p)

    async def verify_all(self, committed: dict[int, int] | None = None) -> None:
        """:meth:`verify` every assigned partition now (``committed``: offsets to check to)."""
        committed = committed or {}
        await asyncio.gather(*(self.verify(p, committed.get(p), check_end=True)
                               for p in sorted(self.assigned)))

    async def verify_assigned(self, partitions, group: str) -> None:
        """On assignment: Redis must have applied at least the group's committed offsets,
        and nothing beyond the log's end (else the partition stops: a REWIND)."""
        loop = asyncio.get_running_loop()
        committed = await loop.run_in_executor(None, committed_offsets, self.bootstrap, group,
                                               self.topic, sorted(partitions))
        await asyncio.gather(*(self.verify(p, c, check_end=True) for p, c in committed.items()))

    def stop_partition(self, partition: int, reason: str) -> None:
        """Stop one partition (REWIND): its messages are refused, counted, never applied."""
        if partition not in self.stopped:
            log.error("stopping %s[%d]: %s", self.topic, partition, reason)
            self.metrics.rewinds.labels(self.topic, str(partition)).inc()
            self.metrics.stopped.labels(self.topic, str(partition)).set(1)
        self.stopped[partition] = reason
        self.state.last_error = reason
        if self.pause is not None:
            self.pause(partition)

    async def check_redis(self) -> None:
        """Run periodically: after a Redis restart or an outage, verify every partition now.

        A restart shows as a new ``run_id``; an outage as a failed command here or in a
        batch. Until every assigned partition verified cleanly, the next call tries again.
        """
        try:
            run_id = (await self.store.client.info("server"))["run_id"]
        except Exception:  # noqa: BLE001 - an outage: verify once Redis answers again
            self._redis_lost = True
            return
        if self._redis_lost or self._redis_run_id not in (None, run_id):
            log.warning("Redis restarted or came back: verifying every assigned %s partition",
                        self.topic)
            self._redis_lost = True
            self._redis_run_id = run_id
            await self.verify_all()
            self._redis_lost = False
        self._redis_run_id = run_id

    def on_revoked(self, partitions) -> None:
        """Another worker may write these from now on: forget what we knew of them."""
        for p in partitions:
            self.assigned.discard(p)
            self._next.pop(p, None)

    async def _read_gap(self, topic: str, partition: int, start: int, stop: int) -> list[Message]:
        log.warning("Redis state for %s[%d] ends at offset %d, %d was applied: re-reading the gap",
                    topic, partition, start, stop)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, read_range, self.bootstrap, topic, partition,
                                          start, stop)

    async def verify(self, partition: int, upto: int | None = None,
                     check_end: bool = False) -> list[Output]:
        """Check one partition now: re-read and apply what Redis lost below ``upto``.

        ``upto`` defaults to this worker's own last write; on assignment the caller
        passes the group's committed offset. With ``check_end``, Redis recording more
        than the log holds stops the partition (REWIND); the log end is asked after
        Redis, under the partition's lock, so this worker's own progress cannot pass it. Returns the repair's outputs
        (rows of the re-read events), or sends them through :attr:`send` while the
        partition is still locked, so they go out before the partition's next batch.
        """
        async with self._lock(partition):
            upto = self._next.get(partition) if upto is None else upto
            if partition in self.stopped or not (upto or check_end):
                return []
            recorded = (await self.store.next_offsets(partition)).get(self.topic, 0)
            end = recorded
            if check_end and recorded:
                ends = await asyncio.get_running_loop().run_in_executor(
                    None, log_ends, self.bootstrap, self.topic, [partition])
                end = ends[partition]
            if recorded > end:
                self.stop_partition(partition, (
                    f"{self.topic}[{partition}]: REWIND: Redis records offsets up to {recorded} "
                    f"as applied, but the broker's log ends at {end}: the log was reset while "
                    f"Redis kept its state. Run `headwater reset` (wipes Redis, the model store "
                    f"and the broker's log) and replay."))
                return []
            if not upto or recorded >= upto:
                return []
            gap = await self._read_gap(self.topic, partition, recorded, upto)
            cols = await self._decode(self.topic, partition, gap, [], emit=False)
            outputs = await self._apply(self.topic, partition, cols, recorded, recorded, [])
            if self.send is not None and outputs:
                await self.send(outputs)
                return []
            return outputs

    async def _decode(self, topic: str, partition: int, messages: list[Message], outputs: list[Output],
                emit: bool) -> dict:
        """Columns of the valid, non-duplicate events (with ``offset`` and ``sub``).

        With ``emit``, rejects and duplicates go to dead-letter and are counted; a gap
        re-read's went out the first time, so they are only dropped again.
        """
        batch = decode_clicks([value for _, _, value in messages], self.settings.max_message_bytes)
        offsets = np.fromiter((m[0] for m in messages), np.int64, len(messages))
        cols = batch.columns
        cols["offset"] = offsets[batch.message]
        cols["sub"] = batch.sub.astype(np.int32)
        n_decoded = len(cols["ts"])
        cols = await self._drop_duplicates(cols, topic, partition, messages, outputs if emit else None)
        if emit:
            for m, index, raw, reason in batch.errors:
                offset, key, _ = messages[m]
                outputs.append((self.topics["dead-letter"], key,
                                dead_letter(reason, topic, partition, offset, raw, index), None))
                self.metrics.dead_letters.labels(topic, reason_kind(reason)).inc()
            n_valid = len(cols["ts"])
            self.metrics.events_in.labels(topic).inc(n_decoded + len(batch.errors))
            self.metrics.events_valid.labels(topic).inc(n_valid)
            self.metrics.messages_in.labels(topic).inc(len(messages))
        return cols

    async def _drop_duplicates(self, cols: dict, topic: str, partition: int, messages: list[Message],
                         outputs: list[Output] | None) -> dict:
        ids = [str(e) for e in cols["event_id"]]
        try:
            dup, first = await self.recent.duplicates(topic, partition, ids, cols["offset"], cols["sub"])
        except Exception:
            self.state.redis_ok = False
            self._redis_lost = True
            raise
        if not dup.any():
            return cols
        keys = {m[0]: m[1] for m in messages}
        for i in np.flatnonzero(dup) if outputs is not None else ():
            off, sub = int(cols["offset"][i]), int(cols["sub"][i])
            first_off, first_sub = first[i].split(":")
            reason = (f"clicks[{sub}]: duplicate event_id {ids[i]!r} "
                      f"(first seen at offset {first_off}, event {first_sub})")
            original = json.dumps({"event_id": ids[i], "user_id": str(cols["user_id"][i]),
                                   "item_id": str(cols["item_id"][i]), "ts": float(cols["ts"][i]),
                                   "label": int(cols["label"][i])}).encode()
            outputs.append((self.topics["dead-letter"], keys.get(off),
                            dead_letter(reason, topic, partition, off, original, sub), None))
            self.metrics.dead_letters.labels(topic, "duplicate").inc()
        keep = ~dup
        return {k: (v[keep] if isinstance(v, np.ndarray) else [x for x, ok in zip(v, keep, strict=True) if ok])
                for k, v in cols.items()}

    def _encode(self, columns: dict, topic: str, partition: int) -> list[Output]:
        """Arrow batches of at most ``train_message_rows`` rows (messages stay small)."""
        n = len(columns["event_id"])
        step = self.settings.train_message_rows
        schema_json, schema_hash = self.builder.schema.to_json(), self.builder.schema.hash
        out: list[Output] = []
        for start in range(0, n, step):
            chunk = {name: col[start:start + step] for name, col in columns.items()}
            offsets = chunk["offset"]
            payload = encode_batch(chunk, schema_json, schema_hash, topic, partition,
                                   int(offsets.min()), int(offsets.max()) + 1)
            out.append((self.topics["train-batches"], str(partition).encode(), payload, None))
        self.metrics.events_out.labels(self.topics["train-batches"]).inc(n)
        return out

    async def __call__(self, topic: str, partition: int, messages: list[Message]) -> list[Output]:
        if partition in self.stopped:
            self.metrics.refused.labels(topic).inc(len(messages))
            return []
        async with self._lock(partition):
            outputs: list[Output] = []
            cols = await self._decode(topic, partition, messages, outputs, emit=True)
            first = messages[0][0]
            outputs = await self._apply(topic, partition, cols, first,
                                        self._next.get(partition, first), outputs)
            if self.on_clicks is not None and partition not in self.stopped and len(cols["ts"]):
                await self.on_clicks(cols)
            return outputs

    async def _apply(self, topic: str, partition: int, cols: dict, start: int,
                     expect_next: int, outputs: list[Output]) -> list[Output]:
        """Apply ``cols`` (the events of messages from offset ``start`` on), fenced.

        Called with the partition's lock held. When Redis is behind ``expect_next``
        (:class:`GapError`), the messages from its recorded offset up to ``start`` are
        read back from Kafka and applied first, in the same write.
        """
        t0 = time.perf_counter()
        while True:
            if not len(cols["ts"]):
                return outputs
            try:
                result = await self.store.apply_batch(topic, partition, cols, expect_next=expect_next)
                break
            except GapError as exc:
                if exc.recorded < start:
                    missing = await self._read_gap(topic, partition, exc.recorded, start)
                    before = await self._decode(topic, partition, missing, outputs, emit=False)
                    cols = {k: _concat(before[k], v) for k, v in cols.items()}
                    start = exc.recorded
                expect_next = exc.recorded
            except RewindError as exc:
                self.stop_partition(partition, str(exc))
                self.metrics.refused.labels(topic).inc(len(np.unique(cols["offset"])))
                return outputs
            except Exception:
                self.state.redis_ok = False
                self._redis_lost = True
                raise
        self.state.redis_ok = True
        self.metrics.batch_size.labels(topic).observe(len(cols["ts"]))
        self._next[partition] = result.next_offset
        keep = np.asarray(result.valid, bool)
        if keep.any():
            columns = self.builder.build(cols, result.features, result.item_attrs, result.codes)
            if not keep.all():
                columns = {name: col[keep] for name, col in columns.items()}
            outputs.extend(self._encode(columns, topic, partition))
        self.metrics.batch_seconds.labels(topic).observe(time.perf_counter() - t0)
        return outputs
