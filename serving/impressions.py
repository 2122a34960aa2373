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
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from streams.replay import partition_of

__all__ = ["ImpressionLog", "encode_impression", "impression_record"]

log = logging.getLogger(__name__)

_STOP = object()


def impression_record(request_id: str, user_id: Any, candidates: list, scores: np.ndarray,
                      categorical: np.ndarray, dense: np.ndarray, ts: float,
                      model_version: str, schema_hash: str) -> dict[str, Any]:
    """The object of one impression (the ``impression-event`` contract), its rows still as
    arrays: :func:`encode_impression` writes them as JSON straight from the arrays.

    >>> r = impression_record("r1", 7, ["a", "b"], np.array([0.5, 0.25]),
    ...                       np.array([[1, 2], [3, 4]]), np.array([[0.5], [1.0]], np.float32),
    ...                       1.7e9, "3", "h")
    >>> r["candidates"][1], r["categorical"][1].tolist(), r["dense"].dtype
    ({'item_id': 'b', 'position': 1, 'score': 0.25}, [3, 4], dtype('float32'))
    """
    return {
        "request_id": request_id,
        "ts": float(ts),
        "user_id": user_id,
        "model_version": str(model_version),
        "schema_hash": schema_hash,
        "candidates": [{"item_id": c, "position": i, "score": s}
                       for i, (c, s) in enumerate(zip(candidates, scores.tolist(), strict=True))],
        "categorical": np.ascontiguousarray(categorical, np.int64),
        "dense": np.ascontiguousarray(dense, np.float32),
    }


def encode_impression(record: dict[str, Any]) -> bytes:
    """JSON bytes of an impression; numpy rows are written by orjson from the arrays (no
    Python list per row: about half the cost of lists and msgspec for 100 candidates). A float32 is written as
    the shortest text that reads back as the same float32, which is what the joiner reads
    them as (``np.asarray(dense, np.float32)``).

    >>> r = impression_record("r1", 7, ["a"], np.array([0.5]), np.array([[1, 2]]),
    ...                       np.array([[0.1]], np.float32), 1.5, "3", "h")
    >>> encode_impression(r).split(b'"candidates":')[1]
    b'[{"item_id":"a","position":0,"score":0.5}],"categorical":[[1,2]],"dense":[[0.1]]}'
    >>> bool(np.float32(orjson.loads(encode_impression(r))["dense"][0][0]) == np.float32(0.1))
    True
    """
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)


class ImpressionLog:
    """A bounded buffer in front of a producer thread (see the module doc).

    ``send(key, value, partition)`` produces one record (a Kafka producer's ``send``
    bound to the topic, returning a future); ``make_sender`` builds it in the thread, so
    an unreachable broker delays logging, never the server's start. The thread takes
    what arrived every ``period`` seconds while records keep coming (the producer
    lingers anyway), so the request path never wakes a thread: at 200 answers/s, 1 wake
    per period instead of 200 GIL hand-offs.
    """

    def __init__(self, make_sender: Callable[[], tuple[Callable[..., Any], Callable[[], None]]],
                 partitions: int, capacity: int, registry: CollectorRegistry | None = None,
                 period: float = 0.01) -> None:
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

    def _run(self) -> None:
        try:
            send, flush = self._make_sender()
        except Exception:  # noqa: BLE001 - logging must never take serving down
            log.exception("impression logging disabled: no producer")
            return
        buffer, wake = self._buffer, self._wake
        stop = False
        while not stop:
            if not buffer:
                wake.wait()
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
            self._send_all(send, taken)
        try:
            flush()
        except Exception:  # noqa: BLE001
            log.exception("flushing impressions failed")

    def _send_all(self, send: Callable[..., Any], taken: list) -> None:
        records, keys = [], []
        for record in taken:
            try:
                if callable(record):
                    record = record()
                keys.append(str(record["user_id"]))
                records.append(record)
            except Exception:  # noqa: BLE001 - one bad record never stops the others
                log.exception("building an impression failed")
                self.dropped.labels("send").inc()
        if not records:
            return
        parts = partition_of(keys, self.partitions).tolist()
        logged, dropped = self.logged, self.dropped
        for record, key, part in zip(records, keys, parts, strict=True):
            try:
                future = send(key.encode(), encode_impression(record), part)
                future.add_callback(lambda _m: logged.inc())
                future.add_errback(lambda _e: dropped.labels("send").inc())
            except Exception:  # noqa: BLE001
                log.exception("logging an impression failed")
                dropped.labels("send").inc()


def kafka_sender(bootstrap: str, topic: str, linger_ms: int = 5):
    """``make_sender`` for :class:`ImpressionLog` over a real broker; the producer sends
    what it gathered every ``linger_ms`` (``HEADWATER_IMPRESSION_LINGER_MS`` in serving)."""
    def make():
        from streams.producer import make_producer

        producer = make_producer(bootstrap, connect_timeout=3600.0, linger_ms=linger_ms)

        def send(key: bytes, value: bytes, partition: int):
            return producer.send(topic, key=key, value=value, partition=partition)

        def flush() -> None:
            producer.flush(timeout=5)
            producer.close(timeout=5)

        return send, flush
    return make
