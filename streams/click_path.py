"""The click path of the worker: events → counters in Redis → point-in-time rows → Arrow.

Per partition batch: decode and validate (rejects to ``dead-letter``), apply the batch
to the counters in one Lua call that also returns every event's features as they were
before it, build rows with the shared row builder, and produce one Arrow IPC batch to
``train-batches`` carrying the source partition and offset range.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from features.defaults import row_builder as make_row_builder
from features.rows import RowBuilder
from features.store import OnlineStore
from headwater.settings import Settings
from learner.batch import encode_batch
from streams.app import Message, Output
from streams.deadletter import dead_letter, reason_kind
from streams.metrics import WorkerMetrics
from streams.schemas import ClickEvent, decode_message

log = logging.getLogger(__name__)


def events_to_columns(events: list[ClickEvent], offsets: list[int], subs: list[int]) -> dict:
    """Columnar view of decoded click events (the shape ``OnlineStore.apply_batch`` takes)."""
    return {
        "event_id": [str(e.event_id) for e in events],
        "ts": np.fromiter((e.ts for e in events), np.float64, len(events)),
        "user_id": [str(e.user_id) for e in events],
        "item_id": [str(e.item_id) for e in events],
        "label": np.fromiter((e.label for e in events), np.int8, len(events)),
        "offset": np.asarray(offsets, np.int64),
        "sub": np.asarray(subs, np.int32),
        "context": [e.context or None for e in events],
        "user": [e.user or None for e in events],
    }


class ClickHandler:
    """The click agent's domain step for one partition's batch."""

    def __init__(self, settings: Settings, client, metrics: WorkerMetrics, state,
                 builder: RowBuilder | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.metrics = metrics
        self.state = state
        self.store = OnlineStore(client, partitions=settings.partitions,
                                 registry=metrics.registry)
        self.builder = builder or make_row_builder(settings)

    async def on_assigned(self, app, partitions) -> None:
        """Seek each assigned clicks partition to the next offset recorded beside the state."""
        for tp in partitions:
            try:
                offsets = await self.store.next_offsets(tp.partition)
            except Exception as exc:  # noqa: BLE001 - Redis down: Faust's committed offset stands
                log.warning("cannot read offsets for %s from Redis: %s", tp, exc)
                self.state.on_error(exc)
                continue
            nxt = offsets.get(tp.topic)
            if nxt is not None:
                log.info("seeking %s to offset %d recorded in Redis", tp, nxt)
                await app.consumer.seek(tp, nxt)

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
        events: list[ClickEvent] = []
        offsets: list[int] = []
        subs: list[int] = []
        limit = self.settings.max_message_bytes
        for offset, key, value in messages:
            decoded = decode_message(value, ClickEvent, limit)
            for index, raw, reason in decoded.errors:
                outputs.append((self.topics["dead-letter"], key,
                                dead_letter(reason, topic, partition, offset, raw, index), None))
                self.metrics.dead_letters.labels(topic, reason_kind(reason)).inc()
            events.extend(decoded.events)
            offsets.extend([offset] * len(decoded.events))
            subs.extend(decoded.subs)
            self.metrics.events_in.labels(topic).inc(len(decoded.events) + len(decoded.errors))
        self.metrics.messages_in.labels(topic).inc(len(messages))
        if not events:
            return outputs
        self.metrics.events_valid.labels(topic).inc(len(events))
        self.metrics.batch_size.labels(topic).observe(len(events))
        cols = events_to_columns(events, offsets, subs)
        t_redis = time.perf_counter()
        result = await self.store.apply_batch(topic, partition, cols)
        self.metrics.redis_seconds.labels("apply").observe(time.perf_counter() - t_redis)
        self.state.redis_ok = True
        if result.duplicate_count:
            self.metrics.duplicates.labels(topic).inc(result.duplicate_count)
        if result.late_count:
            self.metrics.late_events.inc(result.late_count)
        keep = np.asarray(result.valid, bool)
        if keep.any():
            columns = self.builder.build(cols, result.features, result.item_attrs, result.codes)
            if not keep.all():
                columns = {name: col[keep] for name, col in columns.items()}
            outputs.extend(self._encode(columns, topic, partition))
        self.metrics.batch_seconds.labels(topic).observe(time.perf_counter() - t0)
        return outputs
