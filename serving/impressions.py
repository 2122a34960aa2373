"""Impression logging: every ``/v1/score`` answer goes to the ``impressions`` topic.

The request path only puts a reference to what it already computed (scores, the feature
rows, the model version) into a bounded in-memory buffer (:meth:`ImpressionLog.offer`,
never blocking, no lock and no thread wake-up per request: a ``deque`` append; a
callable that builds the record, so even the conversion to JSON types runs off the
request path); one background thread, woken at most once per ``period`` while records
arrive (not once per record), encodes each record as an
:class:`streams.schemas.ImpressionEvent` and produces it, keyed and partitioned by user
(the partitioning of ``clicks`` and ``actions``, so the joiner finds a user's
impressions and actions in the same partition). When the buffer is full the record is
dropped and counted (``headwater_serving_impressions_dropped_total{reason="buffer_full"}``);
a record the broker refuses is counted under ``reason="send"``. Logging can therefore
lose impressions under overload or a broker outage, but never slows or fails a request.

The logged rows are the exact ``categorical``/``dense`` arrays the model scored, so a
training row the joiner builds from them is the served row (no training-serving skew).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import orjson
import pybase64
from prometheus_client import CollectorRegistry, Counter, Gauge

from streams.replay import partition_of

__all__ = ["ImpressionLog", "KafkaSender", "Sender", "encode_impression", "impression_record",
           "kafka_sender"]

log = logging.getLogger(__name__)

_STOP = object()


def impression_record(request_id: str, user_id: Any, candidates: list, scores: np.ndarray,
                      categorical: np.ndarray, dense: np.ndarray, ts: float,
                      model_version: str, schema_hash: str) -> dict[str, Any]:
    """The object of one impression (the ``impression-event`` contract), its rows as the
    matrices' bytes in base64 (little-endian int64 and float32, row after row).

    >>> r = impression_record("r1", 7, ["a", "b"], np.array([0.5, 0.25]),
    ...                       np.array([[1, 2], [3, 4]]), np.array([[0.5], [1.0]], np.float32),
    ...                       1.7e9, "3", "h")
    >>> r["candidates"][1], r["dense"]
    ({'item_id': 'b', 'position': 1, 'score': 0.25}, 'AAAAPwAAgD8=')
    """
    return {
        "request_id": request_id,
        "ts": float(ts),
        "user_id": user_id,
        "model_version": str(model_version),
        "schema_hash": schema_hash,
        "candidates": [{"item_id": c, "position": i, "score": s}
                       for i, (c, s) in enumerate(zip(candidates, scores.tolist(), strict=True))],
        "categorical": _b64(categorical, "<i8"),
        "dense": _b64(dense, "<f4"),
    }


def _b64(matrix: np.ndarray, dtype: str) -> str:
    return pybase64.b64encode_as_string(np.ascontiguousarray(matrix, dtype).data)


def encode_impression(record: dict[str, Any]) -> bytes:
    """JSON bytes of an impression.

    The rows go as base64 of their bytes, not as JSON numbers: a 100-candidate answer
    of 33 hashed tokens and 36 floats a row is 60 kB instead of 110 kB, and takes less
    than half the time to build and write (docs/decisions.md, "Impression rows as bytes").

    >>> from streams.schemas import ImpressionEvent, impression_rows
    >>> import msgspec
    >>> r = impression_record("r1", 7, ["a"], np.array([0.5]), np.array([[1, -2**63]]),
    ...                       np.array([[0.1]], np.float32), 1.7e9, "3", "h")
    >>> cat, dense = impression_rows(msgspec.json.decode(encode_impression(r), type=ImpressionEvent))
    >>> cat.tolist(), bool(dense[0, 0] == np.float32(0.1))
    ([[1, -9223372036854775808]], True)
    """
    return orjson.dumps(record)


class Sender(Protocol):
    """What :class:`ImpressionLog`'s thread sends through (``make_sender`` builds one)."""

    def send(self, key: bytes, value: bytes, partition: int,
             done: Callable[[Exception | None], None]) -> None:
        """Hand one record to the producer; ``done(None)`` once the broker has it,
        ``done(error)`` if it never will (called from :meth:`poll` or :meth:`close`, or
        from ``send`` itself when the producer refuses the record at once). A full queue
        raises ``BufferError``."""

    def poll(self) -> int:
        """Serve the delivery reports that arrived, without waiting; the records still
        in flight."""

    def close(self) -> int:
        """Deliver what is in flight (bounded), then release the producer; the records
        that were still not delivered (their ``done`` never runs: the caller counts them)."""


class ImpressionLog:
    """A bounded buffer in front of a producer thread (see the module doc).

    ``make_sender`` builds the :class:`Sender` in the thread, so an unreachable broker
    delays logging, never the server's start. The thread takes what arrived every
    ``period`` seconds while records keep coming (the producer lingers anyway), so the
    request path never wakes a thread: at 200 answers/s, 1 wake per period instead of
    200 GIL hand-offs. While records are in flight it looks at their delivery reports
    every ``period`` too, so the counters settle without a next request.
    """

    def __init__(self, make_sender: Callable[[], Sender], partitions: int, capacity: int,
                 registry: CollectorRegistry | None = None, period: float = 0.01) -> None:
        self.partitions = partitions
        self.capacity = capacity
        self.period = period
        self._buffer: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._make_sender = make_sender
        self._thread: threading.Thread | None = None
        r = registry if registry is not None else CollectorRegistry()
        self.logged = Counter("headwater_serving_impressions_logged",
                              "Impressions the broker acknowledged.", registry=r)
        self.dropped = Counter("headwater_serving_impressions_dropped",
                               "Impressions not logged: buffer_full (the request never waits) "
                               "or send (the broker refused).", ["reason"], registry=r)
        self._dropped_send = self.dropped.labels("send")
        self.depth = Gauge("headwater_serving_impressions_buffered",
                           "Impressions waiting in serving's buffer.", registry=r)
        self.depth.set_function(lambda: len(self._buffer))

    def offer(self, record: dict[str, Any] | Callable[[], dict[str, Any]]) -> bool:
        """Queue one impression without waiting; False (and counted) when the buffer is full.

        ``record`` is the record, or a function without arguments that builds it (called
        on the logging thread).
        """
        if len(self._buffer) >= self.capacity:
            self.dropped.labels("buffer_full").inc()
            return False
        self._buffer.append(record)
        if not self._wake.is_set():  # the first since the thread last looked: no lock after
            self._wake.set()
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (for at most ``timeout`` seconds), then stop."""
        if self._thread is None:
            return
        self._buffer.append(_STOP)
        self._wake.set()
        self._thread.join(timeout)

    def _delivered(self, error: Exception | None) -> None:
        if error is None:
            self.logged.inc()
        else:
            self._dropped_send.inc()

    def _run(self) -> None:
        try:
            sender = self._make_sender()
        except Exception:  # noqa: BLE001 - logging must never take serving down
            log.exception("impression logging disabled: no producer")
            return
        buffer, wake = self._buffer, self._wake
        stop = False
        while not stop:
            if not buffer:
                # asleep until a record arrives; while records are in flight, also
                # every period to count their delivery reports
                if wake.wait(self.period if sender.poll() else None):
                    wake.clear()  # an offer after this sets it again: nothing is left waiting
                    time.sleep(self.period)  # let the period's records gather
                continue
            # everything gathered goes out in one pass: the per-wake costs (partitioning,
            # the producer's locks and wake-ups) are paid once per period, not per record
            taken = [buffer.popleft() for _ in range(len(buffer))]
            for k, record in enumerate(taken):
                if record is _STOP:
                    stop, taken = True, taken[:k]
                    break
            self._send_all(sender, taken)
        try:
            undelivered = sender.close()
        except Exception:  # noqa: BLE001
            log.exception("flushing impressions failed")
        else:
            if undelivered:  # still in the producer's queue: never logged
                self._dropped_send.inc(undelivered)

    def _send_all(self, sender: Sender, taken: list) -> None:
        records, keys = [], []
        for record in taken:
            try:
                if callable(record):
                    record = record()
                keys.append(str(record["user_id"]))
                records.append(record)
            except Exception:  # noqa: BLE001 - one bad record never stops the others
                log.exception("building an impression failed")
                self._dropped_send.inc()
        if not records:
            return
        parts = partition_of(keys, self.partitions).tolist()
        for record, key, part in zip(records, keys, parts, strict=True):
            try:
                sender.send(key.encode(), encode_impression(record), part, self._delivered)
            except Exception:  # noqa: BLE001
                log.exception("logging an impression failed")
                self._dropped_send.inc()
        sender.poll()


class KafkaSender:
    """A :class:`Sender` over librdkafka (``confluent_kafka``, built by
    :func:`core.kafka.native_producer`): ``send`` copies the record into librdkafka's
    queue and returns; batching, the wire and the acknowledgements are librdkafka's
    threads' work, off the interpreter lock. Idempotent (``acks=all``), like the
    product's other producers: a retried batch is never logged twice. Its queue holds at
    most ``queue_kbytes`` (kafka-python's default buffer, 32 MB): through a broker outage
    serving's memory stays bounded, and what does not fit is dropped and counted."""

    def __init__(self, bootstrap: str, topic: str, linger_ms: int = 5,
                 close_timeout: float = 5.0, queue_kbytes: int = 32 * 1024) -> None:
        from confluent_kafka import KafkaException

        from core.kafka import MAX_MESSAGE_BYTES, native_producer

        self._refused = KafkaException  # what produce raises for a record it refuses at once
        self.topic = topic
        self.close_timeout = close_timeout
        self._producer = native_producer(bootstrap, **{
            "linger.ms": linger_ms, "enable.idempotence": True, "acks": "all",
            "message.timeout.ms": 300_000, "queue.buffering.max.kbytes": queue_kbytes,
            "message.max.bytes": MAX_MESSAGE_BYTES})

    def send(self, key: bytes, value: bytes, partition: int,
             done: Callable[[Exception | None], None]) -> None:
        def report(error: Any, _message: Any) -> None:
            done(None if error is None else RuntimeError(str(error)))

        try:
            try:
                self._producer.produce(self.topic, value, key, partition, on_delivery=report)
            except BufferError:  # librdkafka's queue is full: let it drain a little, once
                self._producer.poll(0.05)
                self._producer.produce(self.topic, value, key, partition, on_delivery=report)
        except self._refused as exc:
            # refused before it was queued: with the topic's metadata already known,
            # librdkafka refuses a partition the topic lacks at once; without it, the
            # same record fails in its delivery report. Either way ``done`` hears it once.
            done(RuntimeError(str(exc.args[0] if exc.args else exc)))

    def poll(self) -> int:
        self._producer.poll(0)
        return len(self._producer)

    def close(self) -> int:
        left = self._producer.flush(self.close_timeout)
        if left:
            log.warning("%d impressions not delivered at close", left)
        return left


def kafka_sender(bootstrap: str, topic: str, linger_ms: int = 5) -> Callable[[], Sender]:
    """``make_sender`` for :class:`ImpressionLog` over a real broker; the producer sends
    what it gathered every ``linger_ms`` (``HEADWATER_IMPRESSION_LINGER_MS`` in serving)."""
    return functools.partial(KafkaSender, bootstrap, topic, linger_ms)
