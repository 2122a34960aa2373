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
from collections import OrderedDict

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from features.defaults import row_builder as make_row_builder
from features.rows import RowBuilder
from features.store import OnlineStore
from headwater.settings import Settings
from learner.batch import encode_batch
from streams.app import Message, Output
from streams.deadletter import dead_letter, reason_kind
from streams.metrics import WorkerMetrics
from streams.schemas import ClickEvent, click_columns, decode_clicks

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
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
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


class RecentIds:
    """Bounded memory of recent event ids per partition: id -> (offset, sub) first seen.

    The same id at the same (offset, sub) is a replay of the same message (harmless: the
    counters skip it); at another position it is a duplicate event and is refused. The
    window is the newest ``capacity`` ids per partition since the worker started (clicks
    are keyed by user, so one user's events and their duplicates meet in one partition).
    """

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._seen: dict[int, OrderedDict[str, tuple[int, int]]] = {}

    def duplicates(self, partition: int, event_ids, offsets, subs) -> np.ndarray:
        """Mask of events whose id was already seen at another position."""
        seen = self._seen.setdefault(partition, OrderedDict())
        dup = np.zeros(len(event_ids), bool)
        for i, (eid, off, sub) in enumerate(zip(event_ids, offsets.tolist(), subs.tolist(), strict=True)):
            first = seen.get(eid)
            if first is None:
                seen[eid] = (off, sub)
            elif first != (off, sub):
                dup[i] = True
        while len(seen) > self.capacity:
            seen.popitem(last=False)
        return dup


class ClickHandler:
    """The click agent's domain step for one partition's batch.

    Batches of different partitions may run concurrently (``concurrent_partitions``):
    each touches only its own shard's state, and its writes are fenced.
    """

    concurrent_partitions = True

    def __init__(self, settings: Settings, client, metrics: WorkerMetrics, state,
                 bootstrap: str, builder: RowBuilder | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.metrics = metrics
        self.state = state
        self.store = OnlineStore(client, partitions=settings.partitions,
                                 registry=metrics.registry)
        self.builder = builder or make_row_builder(settings)
        self.bootstrap = bootstrap
        self._verify: set[int] = set(range(settings.partitions))
        self.recent = RecentIds()

    async def on_assigned(self, app, partitions) -> None:
        """Newly assigned partitions get their Redis offsets checked on their next batch."""
        self._verify.update(tp.partition for tp in partitions)

    def on_redis_error(self) -> None:
        """After an outage Redis may have come back without its last writes: re-check all."""
        self._verify.update(range(self.settings.partitions))

    async def _gap(self, topic: str, partition: int, first_offset: int) -> list[Message]:
        """Messages between the offset recorded beside the state and ``first_offset``.

        The offsets in Redis are the truth (as in Kafka Streams and Flink checkpoints):
        when they are behind the batch — Redis lost writes inside its AOF fsync window,
        or was restored from an older copy — the missing messages are read back from
        Kafka and applied first, so nothing is lost. Ahead of the batch is the normal
        replay case: the Lua script skips what it has already applied.
        """
        recorded = (await self.store.next_offsets(partition)).get(topic, 0)
        if recorded >= first_offset:
            return []
        log.warning("Redis state for %s[%d] ends at offset %d, batch starts at %d: re-reading the gap",
                    topic, partition, recorded, first_offset)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, read_range, self.bootstrap, topic, partition,
                                          recorded, first_offset)

    def _decode(self, topic: str, partition: int, messages: list[Message], outputs: list[Output],
                emit: bool) -> dict:
        """Columns of the valid events (with ``offset`` and ``sub``); rejects to dead-letter."""
        batch = decode_clicks([value for _, _, value in messages], self.settings.max_message_bytes)
        offsets = np.fromiter((m[0] for m in messages), np.int64, len(messages))
        cols = batch.columns
        cols["offset"] = offsets[batch.message]
        cols["sub"] = batch.sub.astype(np.int32)
        if emit:  # a gap re-read's dead letters and counts went out the first time
            n_decoded = len(cols["ts"])
            cols = self._drop_duplicates(cols, topic, partition, messages, outputs)
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

    def _drop_duplicates(self, cols: dict, topic: str, partition: int, messages: list[Message],
                         outputs: list[Output]) -> dict:
        ids = [str(e) for e in cols["event_id"]]
        dup = self.recent.duplicates(partition, ids, cols["offset"], cols["sub"])
        if not dup.any():
            return cols
        first = {}
        for i in np.flatnonzero(~dup):
            first.setdefault(ids[i], int(cols["offset"][i]))
        keys = {m[0]: m[1] for m in messages}
        for i in np.flatnonzero(dup):
            off, sub = int(cols["offset"][i]), int(cols["sub"][i])
            earlier = first.get(ids[i])
            where = f"offset {earlier}" if earlier is not None else "an earlier message"
            reason = f"clicks[{sub}]: duplicate event_id {ids[i]!r} (first seen at {where})"
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
        t0 = time.perf_counter()
        outputs: list[Output] = []
        try:
            gap = await self._gap(topic, partition, messages[0][0]) if partition in self._verify else []
            self._verify.discard(partition)
        except Exception:
            self.on_redis_error()
            raise
        cols = self._decode(topic, partition, messages, outputs, emit=True)
        if gap:
            before = self._decode(topic, partition, gap, outputs, emit=False)
            cols = {k: _concat(before[k], v) for k, v in cols.items()}
        if not len(cols["ts"]):
            return outputs
        self.metrics.batch_size.labels(topic).observe(len(cols["ts"]))
        try:
            result = await self.store.apply_batch(topic, partition, cols)
        except Exception:
            self.state.redis_ok = False
            self.on_redis_error()
            raise
        self.state.redis_ok = True
        keep = np.asarray(result.valid, bool)
        if keep.any():
            columns = self.builder.build(cols, result.features, result.item_attrs, result.codes)
            if not keep.all():
                columns = {name: col[keep] for name, col in columns.items()}
            outputs.extend(self._encode(columns, topic, partition))
        self.metrics.batch_seconds.labels(topic).observe(time.perf_counter() - t0)
        return outputs
