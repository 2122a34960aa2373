"""Broker unreachable at start-up: a clear error, retries with backoff, then it works."""

from __future__ import annotations

import json

import pytest
import redis
from kafka import KafkaProducer

from headwater.servers import free_port, start_broker
from learner.batch import decode_batch
from tests.stackutil import Service, read_topic, service_env, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_worker_waits_for_a_late_broker(redis_url, tmp_path, topic_prefix):
    port = free_port()
    kafka = f"127.0.0.1:{port}"
    env = service_env(kafka, redis_url, topic_prefix, tmp_path, HEADWATER_CONTENT_ENCODER="hashing")
    worker = Service("worker", env, tmp_path / "logs")
    broker = None
    try:
        wait_until(lambda: "unreachable" in worker.log() and "retrying" in worker.log(), 30,
                   what="the worker to report the missing broker", on_fail=worker.log)
        assert worker.alive()
        assert kafka in worker.log()  # the message names the broker it tried
        broker = start_broker(port=port)
        client = redis.Redis.from_url(redis_url)
        wait_until(lambda: any(b"worker" in k for k in client.keys("hw:status:*")), 90,
                   what="the worker to come up", on_fail=worker.log)
        producer = KafkaProducer(bootstrap_servers=kafka)
        event = {"event_id": "late-broker", "ts": 880_000_000, "user_id": "u", "item_id": "i", "label": 1}
        producer.send(f"{topic_prefix}clicks", json.dumps(event).encode(), partition=0)
        producer.flush()
        producer.close()

        def row_arrived():
            return any("late-broker" in map(str, decode_batch(r.value).event_ids)
                       for r in read_topic(kafka, f"{topic_prefix}train-batches"))

        wait_until(row_arrived, 60, what="the event's row", on_fail=worker.log)
    finally:
        worker.stop()
        if broker:
            broker.stop()
