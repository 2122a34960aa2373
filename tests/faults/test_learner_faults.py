"""The learner killed with -9 mid-stream resumes from its last checkpoint and offsets:
the final model has trained on every row exactly once (rows_trained equals the rows sent)."""

from __future__ import annotations

import json
import time

import pytest
import redis
from kafka import KafkaProducer

from core.health import read_all_sync
from learner.store import LocalModelStore
from tests.learner.synth import make_payload
from tests.stackutil import Service, service_env, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MESSAGES, ROWS = 60, 200


def _learner_status(client: redis.Redis) -> dict:
    # the product's reader: a heartbeat that expires between listing and reading is skipped
    docs = [d for d in read_all_sync(client) if d.get("service") == "learner"]
    return max(docs, key=lambda d: d["updated_at"]) if docs else {}


def _produce(bootstrap: str, topic: str, messages: range) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 << 20)
    for i in messages:
        # Two source partitions, offsets increasing within each.
        partition = i % 2
        offset = (i // 2) * ROWS
        producer.send(topic, make_payload(ROWS, offset, seed=i, partition=partition),
                      partition=partition)
    producer.flush()
    producer.close()


def test_learner_kill9_resumes_without_skipping_or_retraining(kafka_bootstrap, redis_db, tmp_path,
                                                              topic_prefix):
    """The first half of the stream is there when the learner starts; it is killed once it
    has published, and the second half arrives before the restart. (Producing everything
    first raced: a learner fast enough trains all rows before its first publication.)"""
    env = service_env(kafka_bootstrap, redis_db, topic_prefix, tmp_path,
                      HEADWATER_PUBLISH_EVERY_SECONDS="1", HEADWATER_EMBEDDING_BUCKETS="64",
                      HEADWATER_EMBEDDING_DIM="4")
    from core.settings import Settings
    from streams.topics import ensure_topics

    ensure_topics(Settings(topic_prefix=topic_prefix), kafka_bootstrap)
    topic = f"{topic_prefix}train-batches"
    half = MESSAGES // 2
    _produce(kafka_bootstrap, topic, range(half))
    client = redis.Redis.from_url(redis_db)
    store = LocalModelStore(tmp_path / "models", "ranker")
    first = Service("learner", env, tmp_path / "logs")
    second = None
    try:
        wait_until(lambda: store.versions() and store.manifest(store.versions()[-1])["rows_trained"] > 0,
                   120, interval=0.1, what="a first publication", on_fail=first.log)
        first.kill9()
        at_kill = store.manifest(store.versions()[-1])["rows_trained"]
        _produce(kafka_bootstrap, topic, range(half, MESSAGES))
        second = Service("learner", env, tmp_path / "logs")
        wait_until(lambda: _learner_status(client).get("rows_trained") == MESSAGES * ROWS, 180,
                   interval=0.5, what="every row trained after the restart",
                   on_fail=lambda: second.log() + json.dumps(_learner_status(client)))
        time.sleep(1.5)  # one more publication period
        second.stop()  # publishes on the way out
        final = store.manifest(store.versions()[-1])
        assert final["rows_trained"] == MESSAGES * ROWS
        assert 0 < at_kill <= half * ROWS
        marks = final["watermarks"]
        assert marks, "the checkpoint carries per-partition watermarks"
    finally:
        for svc in (first, second):
            if svc is not None:
                svc.stop()
