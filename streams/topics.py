"""Topic declarations: the contract names of docs/design.md, created on start."""

from __future__ import annotations

import logging
import time

import numpy as np
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from core import kafka as kafka_clients
from core.net import port_open
from core.settings import Settings
from features.hashing import hash_tokens

log = logging.getLogger(__name__)

#: Topics whose partitions follow ``Settings.partitions``; the rest have one.
PARTITIONED = ("clicks", "items", "audit", "train-batches", "alerts", "dead-letter", "impressions",
               "actions")


def partition_of(keys, partitions: int) -> np.ndarray:
    """The partition of each key: clicks are keyed by user, items by item (the worker's
    counters and duplicate window are sharded so). A stable hash (the feature tokens'),
    not Python's per-process ``hash``; every producer of the product partitions by it.

    >>> partition_of(["42", "42", "1"], 4).tolist()
    [0, 0, 3]
    """
    return (hash_tokens("partition", list(keys)) % partitions).astype(np.int64)


def topic_specs(settings: Settings) -> list[NewTopic]:
    specs = []
    for logical, real in settings.topics.items():
        if logical == "model-updates":
            # One key per model name; compaction keeps the newest publication.
            specs.append(NewTopic(real, 1, settings.replication_factor, topic_configs={"cleanup.policy": "compact"}))
        else:
            n = settings.partitions if logical in PARTITIONED else 1
            specs.append(NewTopic(real, n, settings.replication_factor))
    return specs


def wait_for_broker(bootstrap: str, timeout: float) -> None:
    """Block until one bootstrap address accepts TCP connections, with capped backoff.

    Probing the socket ourselves keeps the message plain (the Kafka clients retry
    internally and only log connection errors) and names the address tried.
    """
    deadline = time.monotonic() + timeout
    delay = 0.2
    addresses = [a.strip() for a in bootstrap.split(",") if a.strip()]
    while True:
        for address in addresses:
            host, _, port = address.rpartition(":")
            if port_open(host or "127.0.0.1", int(port), timeout=1.0):
                return
        if time.monotonic() + delay > deadline:
            raise RuntimeError(
                f"Kafka broker at {bootstrap} unreachable for {timeout:.0f}s; "
                "start it (headwater up) or set HEADWATER_KAFKA"
            )
        log.warning("Kafka broker at %s unreachable; retrying in %.1fs", bootstrap, delay)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def ensure_topics(settings: Settings, bootstrap: str, timeout: float = 30.0) -> list[str]:
    """Create the missing topics; retries with backoff while the broker is unreachable.

    Returns the names created. Raises ``RuntimeError`` naming the broker when it never
    answers within ``timeout``.
    """
    wait_for_broker(bootstrap, timeout)
    admin = kafka_clients.admin(bootstrap, client_id="headwater-admin",
                             request_timeout_ms=10_000)
    try:
        existing = set(admin.list_topics())
        missing = [s for s in topic_specs(settings) if s.name not in existing]
        created = []
        for spec in missing:
            try:
                admin.create_topics([spec])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def high_watermarks(consumer, tps, lower: dict, timeout: float = 1.5) -> dict:
    """Each partition's high watermark, from one fetch at its end (the ones answered in time).

    Tansu 0.6 answers ListOffsets(latest) with the *base offset of the last record
    batch* plus one, not the high watermark (after one producer batch of 5 records it
    says 1, not 5); the Fetch response's high watermark is right. ``lower`` is that
    ListOffsets answer (a lower bound): the fetch starts one record before it.
    """
    consumer.assign([])  # fresh partition states: highwater None until a fetch answers
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, max(0, lower[tp] - 1))
    out: dict = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(tps) and time.monotonic() < deadline:
        consumer.poll(timeout_ms=100, max_records=1000)
        for tp in tps:
            hw = consumer.highwater(tp)
            if hw is not None:
                out[tp] = int(hw)
    return out


def log_ends(bootstrap: str, topic: str, partitions, timeout: float = 30.0) -> dict[int, int]:
    """Each partition's log end offset (the offset its next message gets), exactly.

    Raises ``TimeoutError`` rather than answer a lower bound: callers compare state
    recorded elsewhere against it (a REWIND check), where a low answer is a false alarm.
    """
    from kafka import TopicPartition

    consumer = kafka_clients.consumer(bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        lower = {tp: int(o) for tp, o in consumer.end_offsets(tps).items()}
        ends = {tp: o for tp, o in lower.items() if o == 0}  # an empty log has no batch
        rest = [tp for tp in tps if tp not in ends]
        if rest:
            ends.update(high_watermarks(consumer, rest, lower, timeout))
        missing = [tp.partition for tp in tps if tp not in ends]
        if missing:
            raise TimeoutError(f"no high watermark for {topic} partitions {missing} "
                               f"within {timeout:.0f}s")
        return {tp.partition: max(lower[tp], ends[tp]) for tp in tps}
    finally:
        consumer.close()
