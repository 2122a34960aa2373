"""The click path of the worker: events → counters in Redis → point-in-time rows → Arrow.

Per partition batch: decode and validate (:mod:`streams.click_decode`; rejects to
``dead-letter``), drop duplicate event ids (:mod:`streams.click_dedup`), apply the batch
to the counters in one fenced write that also returns every event's features as they
were before it (the online store), build rows with the shared row builder and encode
them as Arrow batches for ``train-batches`` carrying the source partition and offset
range (:mod:`streams.click_rows`). A store that lost writes is caught up from the log
first (:mod:`streams.click_recovery`). :class:`ClickHandler` only strings these together.
"""

from __future__ import annotations

import time

import numpy as np

from core.settings import Settings
from features.defaults import row_builder as make_row_builder
from features.event_ids import EventIdWindow
from features.rows import RowBuilder
from features.store import OnlineStore
from features.store_apply import GapError, RewindError
from features.store_protocol import DuplicateWindow, OnlineFeatureStore
from streams.click_decode import concat_columns, decode_click_messages
from streams.click_dedup import DuplicateFilter
from streams.click_recovery import GapRecovery, Partitions
from streams.click_rows import RowEncoder
from streams.deadletter import reason_kind
from streams.events import EventLog, EventSink, KafkaLog, Message, Output
from streams.metrics import WorkerMetrics

__all__ = ["ClickHandler", "click_handler", "counter_store"]


class ClickHandler:
    """The click agent's domain step for one partition's batch.

    Batches of different partitions may run concurrently (``concurrent_partitions``):
    each touches only its own shard's state, and its writes are fenced. The parts are
    injected: ``store`` (:class:`features.store_protocol.OnlineFeatureStore`),
    ``window`` (duplicate ids), ``events`` (the log, read back to repair a store that
    lost writes) and ``sink`` (where a repair's outputs go; without one they are
    returned); :func:`click_handler` builds the worker's from Redis and Kafka.
    """

    concurrent_partitions = True

    def __init__(self, settings: Settings, metrics: WorkerMetrics, state, *,
                 store: OnlineFeatureStore, window: DuplicateWindow, events: EventLog,
                 builder: RowBuilder | None = None, sink: EventSink | None = None,
                 pause=None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.topic = self.topics["clicks"]
        self.metrics = metrics
        self.state = state
        self.store = store
        self.builder = builder or make_row_builder(settings)
        self.dedup = DuplicateFilter(window, self.topics["dead-letter"])
        self.rows = RowEncoder(self.builder, self.topics["train-batches"],
                               settings.train_message_rows)
        self.partitions = Partitions(self.topic, metrics, state, pause)
        self.recovery = GapRecovery(self.partitions, store, events, self._reapply, sink)
        #: partition -> why it is stopped (a REWIND); its messages are refused
        self.stopped = self.partitions.stopped
        # What the worker calls, by name.
        self.on_assigned = self.partitions.on_assigned
        self.on_revoked = self.partitions.on_revoked
        self.verify = self.recovery.verify
        self.verify_all = self.recovery.verify_all
        self.verify_assigned = self.recovery.verify_assigned
        self.check_redis = self.recovery.check_store
        #: called with each applied batch's columns (QARM pair mining; set by the worker)
        self.on_clicks = None

    async def __call__(self, topic: str, partition: int, messages: list[Message]) -> list[Output]:
        if partition in self.stopped:
            self.metrics.refused.labels(topic).inc(len(messages))
            return []
        async with self.partitions.lock(partition):
            outputs: list[Output] = []
            cols = await self._columns(topic, partition, messages, outputs)
            first = messages[0][0]
            outputs = await self._apply(topic, partition, cols, first,
                                        self.partitions.next.get(partition, first), outputs)
            if self.on_clicks is not None and partition not in self.stopped and len(cols["ts"]):
                await self.on_clicks(cols)
            return outputs

    async def _reapply(self, partition: int, messages: list[Message], start: int) -> list[Output]:
        """Messages read back from the log (a repair), applied from ``start``; their
        rejects and duplicates went to dead-letter the first time, so are only dropped."""
        cols = await self._columns(self.topic, partition, messages, None)
        return await self._apply(self.topic, partition, cols, start, start, [])

    async def _columns(self, topic: str, partition: int, messages: list[Message],
                       outputs: list[Output] | None) -> dict:
        """Columns of the valid, non-duplicate events (with ``offset`` and ``sub``).

        With ``outputs``, rejects and duplicates are dead-lettered into it and counted.
        """
        decoded = decode_click_messages(messages, self.settings.max_message_bytes)
        n_decoded = decoded.n_valid
        try:
            cols, n_dups = await self.dedup.drop(decoded.columns, topic, partition, messages,
                                                 outputs)
        except Exception:
            self.partitions.lost_store()
            raise
        if outputs is not None:
            m = self.metrics
            if n_dups:
                m.dead_letters.labels(topic, "duplicate").inc(n_dups)
            outputs.extend(decoded.dead_letters(self.topics["dead-letter"], topic, partition, messages))
            for _, _, _, reason in decoded.errors:
                m.dead_letters.labels(topic, reason_kind(reason)).inc()
            m.events_in.labels(topic).inc(n_decoded + len(decoded.errors))
            m.events_valid.labels(topic).inc(len(cols["ts"]))
            m.messages_in.labels(topic).inc(len(messages))
        return cols

    async def _apply(self, topic: str, partition: int, cols: dict, start: int,
                     expect_next: int, outputs: list[Output]) -> list[Output]:
        """Apply ``cols`` (the events of messages from offset ``start`` on), fenced.

        Called with the partition's lock held. When the store is behind ``expect_next``
        (:class:`GapError`), the messages from its recorded offset up to ``start`` are
        read back from the log and applied first, in the same write.
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
                    missing = await self.recovery.read_gap(partition, exc.recorded, start)
                    before = await self._columns(topic, partition, missing, None)
                    cols = concat_columns(before, cols)
                    start = exc.recorded
                expect_next = exc.recorded
            except RewindError as exc:
                self.partitions.stop(partition, str(exc))
                self.metrics.refused.labels(topic).inc(len(np.unique(cols["offset"])))
                return outputs
            except Exception:
                self.partitions.lost_store()
                raise
        self.state.redis_ok = True
        self.metrics.batch_size.labels(topic).observe(len(cols["ts"]))
        self.partitions.next[partition] = result.next_offset
        rows, n_rows = self.rows.outputs(cols, result, topic, partition)
        if rows:
            outputs.extend(rows)
            self.metrics.events_out.labels(self.rows.topic).inc(n_rows)
        self.metrics.batch_seconds.labels(topic).observe(time.perf_counter() - t0)
        return outputs


def counter_store(settings: Settings, client, builder: RowBuilder, registry) -> OnlineStore:
    """The worker's online counters in Redis (``client``: ``redis.asyncio.Redis``), as the
    click path and the joiner both write them: the builder's counters, the settings'
    point-in-time rules, metrics in ``registry``."""
    return OnlineStore(client, partitions=settings.partitions, counters=builder.config.counters,
                       registry=registry, pit_ties=settings.pit_ties,
                       pit_history=settings.pit_history, seq_len=settings.seq_len)


def click_handler(settings: Settings, client, metrics: WorkerMetrics, state, bootstrap: str,
                  builder: RowBuilder | None = None, sink: EventSink | None = None,
                  pause=None) -> ClickHandler:
    """The worker's click handler: the store and the duplicate window in Redis
    (``client``, a ``redis.asyncio.Redis``), the log on the broker at ``bootstrap``."""
    builder = builder or make_row_builder(settings)
    store = counter_store(settings, client, builder, metrics.registry)
    return ClickHandler(settings, metrics, state, store=store,
                        window=EventIdWindow(client, settings.duplicate_window),
                        events=KafkaLog(bootstrap), builder=builder, sink=sink, pause=pause)
