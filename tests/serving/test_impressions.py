"""Every /v1/score answer is logged to the impressions topic with the rows it scored."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid

import numpy as np
from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from core import kafka as kafka_clients
from serving.impressions import ImpressionLog, KafkaSender, kafka_sender
from streams.schemas import ImpressionEvent, decode_message, impression_rows
from streams.topics import ensure_topics
from tests.stackutil import wait_until

from .conftest import NOW, metric_value


def _read_all(bootstrap: str, topic: str, partitions: int, want: int, timeout: float = 20.0) -> list:
    consumer = kafka_clients.consumer(bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out, deadline = [], time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
        return out
    finally:
        consumer.close()


async def test_each_answer_is_logged_with_its_request_id_scores_and_rows(
        settings, seeded_redis, publish, make_app, kafka_bootstrap):
    settings = settings.model_copy(update={"topic_prefix": f"imp-{uuid.uuid4().hex[:6]}-"})
    ensure_topics(settings, kafka_bootstrap)
    publish(0)
    client, ctx = await make_app(settings, seeded_redis)
    ctx.impressions = ImpressionLog(kafka_sender(kafka_bootstrap, settings.topics["impressions"]),
                                    settings.partitions, 100, ctx.registry)
    ctx.impressions.start()
    try:
        one = await (await client.post("/v1/score", json={"user_id": "u1", "candidates": ["i1", "i3"]})).json()
        many = await (await client.post("/v1/score", json={"requests": [
            {"user_id": "u2", "candidates": ["i2"]}, {"user_id": "u1", "candidates": ["i1"]}]})).json()
    finally:
        await asyncio.to_thread(ctx.impressions.close)
    ids = [one["request_id"]] + [r["request_id"] for r in many["results"]]
    assert len(set(ids)) == 3
    records = _read_all(kafka_bootstrap, settings.topics["impressions"], settings.partitions, 3)
    decoded = {}
    for r in records:
        d = decode_message(r.value, ImpressionEvent, now=NOW)
        assert not d.errors, d.errors
        decoded[d.events[0].request_id] = (r, d.events[0])
    assert sorted(decoded) == sorted(ids)
    rec, ev = decoded[one["request_id"]]
    assert rec.key == b"u1" and ev.user_id == "u1"
    assert [(c.item_id, c.position) for c in ev.candidates] == [("i1", 0), ("i3", 1)]
    assert [c.score for c in ev.candidates] == one["scores"]
    assert ev.model_version == one["model_version"] and ev.schema_hash == ctx.scorer.schema.hash
    # the logged rows are the rows the model scored: scoring them again gives the scores
    assert isinstance(ev.categorical, str) and isinstance(ev.dense, str)  # written as bytes
    cat, dense = impression_rows(ev)
    again = ctx.holder.current.predict(cat, dense)
    np.testing.assert_allclose(again, one["scores"], rtol=1e-6)
    assert metric_value((await (await client.get("/metrics")).text()),
                        "headwater_serving_impressions_logged_total") == 3


class _Sender:
    """A :class:`serving.impressions.Sender` that acknowledges at once, through ``on_send``."""

    def __init__(self, on_send) -> None:
        self.on_send = on_send

    def send(self, key, value, partition, done):
        self.on_send(json.loads(value)["request_id"])
        done(None)

    def poll(self) -> int:
        return 0

    def close(self) -> int:
        return 0


def test_a_full_buffer_drops_and_counts_instead_of_waiting():
    release = threading.Event()
    sent = []

    def on_send(request_id):
        release.wait()  # a broker that does not answer
        sent.append(request_id)

    def make():
        return _Sender(on_send)

    registry = CollectorRegistry()
    log = ImpressionLog(make, 4, capacity=2, registry=registry)
    log.start()
    record = {"request_id": "r0", "user_id": "u"}
    t0 = time.perf_counter()
    accepted = [log.offer({**record, "request_id": f"r{i}"}) for i in range(50)]
    elapsed = time.perf_counter() - t0
    # one taken by the blocked thread at most, two buffered: the rest dropped, at once
    assert 2 <= sum(accepted) <= 3 and elapsed < 1.0
    assert registry.get_sample_value("headwater_serving_impressions_dropped_total",
                                     {"reason": "buffer_full"}) == 50 - sum(accepted)
    release.set()
    log.close()
    assert sent == [f"r{i}" for i, ok in enumerate(accepted) if ok]


def test_records_offered_at_any_moment_are_sent_in_order_without_a_lost_wake_up():
    """The request path wakes the logging thread only when it sleeps: records offered
    while it sends, while it waits its period, or after it went back to sleep are all
    sent, in order (a lost wake-up would leave one in the buffer until close)."""
    sent: list[str] = []
    got = threading.Condition()

    def on_send(request_id):
        with got:
            sent.append(request_id)
            got.notify_all()

    def make():
        return _Sender(on_send)

    def wait_for(k: int) -> None:
        with got:
            assert got.wait_for(lambda: len(sent) >= k, timeout=10), (k, sent)

    log = ImpressionLog(make, 4, capacity=1000, registry=CollectorRegistry(), period=0.005)
    log.start()
    want: list[str] = []
    for round_ in range(30):
        burst = [f"r{round_}-{i}" for i in range(round_ % 4 + 1)]
        for rid in burst:
            assert log.offer(lambda rid=rid: {"request_id": rid, "user_id": "u"})
        want += burst
        if round_ % 3:  # sometimes wait until sent (the thread goes back to sleep)
            wait_for(len(want))
        elif round_ % 2:
            time.sleep(0.003)  # sometimes offer again within the thread's period
    wait_for(len(want))
    log.close()
    assert sent == want


def test_a_record_the_broker_refuses_is_reported_as_an_error(kafka_bootstrap, settings):
    """A partition the topic does not have reaches ``done`` as an error, whether
    librdkafka refuses it in its delivery report (the topic's metadata not yet known) or at
    once in ``produce`` (known): the first send races the metadata, the last one not."""
    settings = settings.model_copy(update={"topic_prefix": f"imp-{uuid.uuid4().hex[:6]}-"})
    ensure_topics(settings, kafka_bootstrap)
    sender = KafkaSender(kafka_bootstrap, settings.topics["impressions"], close_timeout=10)
    reports: list = []
    sender.send(b"u", b"{}", settings.partitions + 5, reports.append)
    sender.send(b"u", b"{}", 0, reports.append)
    # an answer to many candidates can pass librdkafka's default 1 MB message: delivered
    sender.send(b"u", b'{"pad": "' + b"x" * (3 << 20) + b'"}', 1, reports.append)
    wait_until(lambda: sender.poll() == 0, 10, 0.05, "the first records' reports")
    assert len(reports) == 3  # reports come in delivery order, not send order
    assert sum(r is None for r in reports) == 2  # both records for real partitions
    assert [str(r) for r in reports if r is not None][0]
    # delivered records: the topic's metadata is known now, so produce refuses at once
    sender.send(b"u", b"{}", settings.partitions + 5, reports.append)
    assert len(reports) == 4 and "partition" in str(reports[3]).lower()
    sender.close()


def test_without_a_broker_every_record_is_counted_dropped_and_memory_stays_bounded():
    """No broker, a librdkafka queue of 4 KB: records that do not fit are refused at once,
    the ones queued are still undelivered at close; all are counted, none as logged."""
    make = functools.partial(KafkaSender, "127.0.0.1:1", "nowhere", 5, 0.2, 4)
    registry = CollectorRegistry()
    log = ImpressionLog(make, 4, capacity=100, registry=registry, period=0.005)
    log.start()
    for i in range(10):
        assert log.offer({"request_id": f"r{i}", "user_id": "u", "pad": "x" * 1500})
    log.close(timeout=30)
    dropped = registry.get_sample_value("headwater_serving_impressions_dropped_total", {"reason": "send"})
    logged = registry.get_sample_value("headwater_serving_impressions_logged_total")
    assert (logged, dropped) == (0, 10)
