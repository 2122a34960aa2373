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


def test_learner_kill9_resumes_without_skipping_or_retraining(kafka_bootstrap, redis_db, tmp_path,
                                                              topic_prefix):
    env = service_env(kafka_bootstrap, redis_db, topic_prefix, tmp_path,
                      HEADWATER_PUBLISH_EVERY_SECONDS="1", HEADWATER_EMBEDDING_BUCKETS="64",
                      HEADWATER_EMBEDDING_DIM="4")
    from core.settings import Settings
    from streams.topics import ensure_topics

    ensure_topics(Settings(topic_prefix=topic_prefix), kafka_bootstrap)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=8 << 20)
    topic = f"{topic_prefix}train-batches"
    for i in range(MESSAGES):
        # Two source partitions, offsets increasing within each.
        partition = i % 2
        offset = (i // 2) * ROWS
        producer.send(topic, make_payload(ROWS, offset, seed=i, partition=partition),
                      partition=partition)
    producer.flush()
    producer.close()
    client = redis.Redis.from_url(redis_db)
    store = LocalModelStore(tmp_path / "models", "ranker")
    first = Service("learner", env, tmp_path / "logs")
    second = None
    try:
        wait_until(lambda: store.versions() and 0 < store.manifest(store.versions()[-1])["rows_trained"]
                   < MESSAGES * ROWS, 120, interval=0.1, what="a first publication mid-stream",
                   on_fail=first.log)
        first.kill9()
        at_kill = store.manifest(store.versions()[-1])["rows_trained"]
        second = Service("learner", env, tmp_path / "logs")
        wait_until(lambda: _learner_status(client).get("rows_trained") == MESSAGES * ROWS, 180,
                   interval=0.5, what="every row trained after the restart",
                   on_fail=lambda: second.log() + json.dumps(_learner_status(client)))
        time.sleep(1.5)  # one more publication period
        second.stop()  # publishes on the way out
        final = store.manifest(store.versions()[-1])
        assert final["rows_trained"] == MESSAGES * ROWS
        assert at_kill < MESSAGES * ROWS
        marks = final["watermarks"]
        assert marks, "the checkpoint carries per-partition watermarks"
    finally:
        for svc in (first, second):
            if svc is not None:
                svc.stop()
