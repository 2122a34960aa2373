"""Kafka I/O around :class:`~learner.service.LearnerService` (kafka-python, no consumer group).

The loop assigns itself every partition of ``train-batches`` (one learner per model:
it must see all rows), seeks each partition to the position saved in the latest
checkpoint (or the beginning; watermarks drop whatever was already trained), feeds
messages to the service, and after each publication sends the manifest plus ``"path"``
to the compacted ``model-updates`` topic keyed by the model name.

Tansu quirks (docs/measurements.md): its fetch long-poll does not wake on new data, so
``fetch_max_wait_ms`` is 50; no group is used, so no join delay.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from core import kafka as kafka_clients
from learner.service import LearnerService
from learner.store import LocalModelStore, ModelStore
from learner.trainer import TrainerSettings

__all__ = ["LearnerLoop", "run_learner"]

log = logging.getLogger(__name__)

_TOPIC_KEYS = ("train-batches", "model-updates")


def train_batches_consumer(bootstrap: str, lag_group: str):
    """The learner's ``train-batches`` consumer (single process and every group member).

    Partitions are assigned by hand (no group join); ``lag_group`` is only where the
    trained positions are committed for lag reporting, so nothing is auto-committed.
    Fetches are large (train batches are big) and the long poll short (Tansu's does not
    wake on new data).
    """
    return kafka_clients.consumer(
        bootstrap,
        group_id=lag_group,
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )


def _topic(topics: dict[str, str], name: str) -> str:
    return topics.get(name) or topics.get(name.replace("-", "_")) or name


class LearnerLoop:
    """One learner process's consume -> train -> publish loop; stop it with :meth:`stop`."""

    def __init__(
        self,
        bootstrap: str,
        topics: dict[str, str],
        store_dir: str | Path | ModelStore,
        model_name: str = "ranker",
        settings: TrainerSettings | None = None,
        publish_every_seconds: float = 5.0,
        publish_every_rows: int | None = None,
        delta_every_seconds: float | None = None,
        keep_versions: int = 5,
        registry: CollectorRegistry | None = None,
        poll_timeout_ms: int = 200,
        max_records: int = 16,
        step_rows: int = 256,
        step_wait_seconds: float = 2.0,
        lag_group: str | None = None,
        max_staleness_seconds: float | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.train_topic = _topic(topics, "train-batches")
        self.updates_topic = _topic(topics, "model-updates")
        self.model_name = model_name
        self.poll_timeout_ms = poll_timeout_ms
        self.max_records = max_records
        self._stop = threading.Event()
        self._producer = kafka_clients.producer(bootstrap, linger_ms=0, acks="all")
        self.service = LearnerService(
            store_dir
            if isinstance(store_dir, ModelStore)
            else LocalModelStore(store_dir, model_name, keep=keep_versions),
            (settings or TrainerSettings()).factory(),
            publish_every_seconds=publish_every_seconds,
            publish_every_rows=publish_every_rows,
            delta_every_seconds=delta_every_seconds,
            on_publish=self._announce,
            registry=registry,
            step_rows=step_rows,
            step_wait_seconds=step_wait_seconds,
        )
        self._consumer: KafkaConsumer | None = None
        self._assigned: list[TopicPartition] = []
        self._rows_per_message = 256.0
        self._lag_messages = 0
        self._last_lag_check = 0.0
        self.lag_group = lag_group
        self.max_staleness_seconds = max_staleness_seconds
        self._committed: dict[str, int] = {}
        self._last_commit = 0.0

    def _announce(self, manifest: dict[str, Any]) -> None:
        value = json.dumps(manifest, sort_keys=True).encode("utf-8")
        future = self._producer.send(self.updates_topic, key=self.model_name.encode(), value=value)
        future.get(timeout=10)

    def stop(self) -> None:
        """Ask :meth:`run` to finish its current batch, publish, and return."""
        self._stop.set()

    def _assign(self) -> None:
        assert self._consumer is not None
        parts = self._consumer.partitions_for_topic(self.train_topic)
        if not parts:
            return
        wanted = [TopicPartition(self.train_topic, p) for p in self._owned(parts)]
        new = [tp for tp in wanted if tp not in self._assigned]
        if not new:
            return
        self._consumer.assign(wanted)
        positions = self.service.consumer_positions
        for tp in wanted:
            saved = positions.get(f"{tp.topic}:{tp.partition}")
            if saved is not None:
                self._consumer.seek(tp, saved)
            elif tp in new:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, self._consumer.position(tp))
        self._assigned = wanted
        log.info("learner assigned %s", [f"{tp.topic}:{tp.partition}" for tp in wanted])

    def _owned(self, parts: set[int]) -> list[int]:
        """The partitions this process trains: all of them (one learner per model)."""
        return sorted(parts)

    def _backlog_rows(self) -> int:
        """Lag in messages (refreshed each second) times the mean rows per message."""
        assert self._consumer is not None
        now = time.monotonic()
        if self._assigned and now - self._last_lag_check >= 1.0:
            self._last_lag_check = now
            ends = self._consumer.end_offsets(self._assigned)
            self._lag_messages = sum(
                max(0, ends[tp] - self._consumer.position(tp)) for tp in self._assigned
            )
        return int(self._lag_messages * self._rows_per_message)

    def _stale(self, msg: Any) -> bool:
        """A message written more than ``max_staleness_seconds`` ago (broker timestamp)."""
        if not self.max_staleness_seconds or msg.timestamp is None or msg.timestamp < 0:
            return False
        return time.time() - msg.timestamp / 1000.0 > self.max_staleness_seconds

    def _commit_trained(self) -> None:
        """Commit the positions of *trained* rows under ``lag_group``, once a second.

        The learner never joins the group (manual assignment, no rebalances); the
        commits exist so ``headwater lag`` and ``/v1/lag`` show the learner's backlog
        beside the worker's. Restarts still seek from the checkpoint's positions.
        """
        now = time.monotonic()
        if self.lag_group is None or now - self._last_commit < 1.0:
            return
        self._last_commit = now
        positions = dict(self.service.consumer_positions)
        changed = {k: v for k, v in positions.items() if self._committed.get(k) != v}
        if not changed:
            return
        from kafka.structs import OffsetAndMetadata

        offsets = {}
        for key, offset in changed.items():
            topic, _, part = key.rpartition(":")
            offsets[TopicPartition(topic, int(part))] = OffsetAndMetadata(offset, "", -1)
        try:
            assert self._consumer is not None
            self._consumer.commit(offsets)
            self._committed.update(changed)
        except Exception as exc:  # noqa: BLE001 - lag reporting must never stop training
            log.warning("learner: committing positions for lag reporting failed: %s", exc)

    def run(self) -> None:
        """Consume until :meth:`stop`; publishes a final version on the way out."""
        self._consumer = train_batches_consumer(self.bootstrap, self.lag_group)
        last_assign = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() - last_assign > 10.0 or not self._assigned:
                    self._assign()
                    last_assign = time.monotonic()
                    if not self._assigned:
                        self._stop.wait(0.5)  # the topic does not exist yet
                        continue
                polled = self._consumer.poll(
                    timeout_ms=self.poll_timeout_ms, max_records=self.max_records
                )
                for tp, messages in polled.items():
                    for msg in messages:
                        if self._stale(msg):
                            self.service.skip_stale(
                                msg.value, position=(tp.topic, tp.partition, msg.offset + 1)
                            )
                            continue
                        self.service.process(
                            msg.value,
                            backlog=self._backlog_rows(),
                            position=(tp.topic, tp.partition, msg.offset + 1),
                        )
                        n = self.service.last_message_rows
                        if n:
                            self._rows_per_message += 0.05 * (n - self._rows_per_message)
                        self.service.maybe_publish()
                self.service.tick()
                self.service.maybe_publish()
                self._commit_trained()
        finally:
            try:
                self.service.flush()
                self.service.maybe_publish(force=True)
            finally:
                self._consumer.close()
                self._producer.flush(timeout=10)
                self._producer.close(timeout=10)


def run_learner(
    bootstrap: str,
    topics: dict[str, str],
    store_dir: str | Path | ModelStore,
    model_name: str = "ranker",
    stop: threading.Event | None = None,
    **kwargs: Any,
) -> LearnerService:
    """Run the learner until ``stop`` is set (or forever); return the service for inspection.

    ``topics`` maps default names (``"train-batches"``, ``"model-updates"``) to real
    names (with any prefix). Other keyword arguments go to :class:`LearnerLoop`.
    """
    loop = LearnerLoop(bootstrap, topics, store_dir, model_name, **kwargs)
    if stop is not None:
        threading.Thread(target=lambda: (stop.wait(), loop.stop()), daemon=True).start()
    loop.run()
    return loop.service
