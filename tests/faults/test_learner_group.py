"""The data-parallel learner group (``--learner-procs 2``) on the real broker and Redis:
every row trained exactly once across the members, and after kill -9 of one member the
group resumes from the last checkpoint without losing or re-training a row."""

from __future__ import annotations

import json
import os

import psutil
import pytest
import redis
from kafka import KafkaProducer

from learner.store import LocalModelStore, ModelStore
from tests.learner.synth import make_payload
from tests.stackutil import Service, service_env, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

ROWS = 200  # rows per train-batches message
PARTITIONS = 4


def _env(kafka_bootstrap, redis_db, topic_prefix, tmp_path, **extra):
    from core.settings import Settings
    from streams.topics import ensure_topics

    ensure_topics(Settings(topic_prefix=topic_prefix), kafka_bootstrap)
    return service_env(kafka_bootstrap, redis_db, topic_prefix, tmp_path,
                       HEADWATER_LEARNER_PROCS="2", HEADWATER_EMBEDDING_BUCKETS="64",
                       HEADWATER_EMBEDDING_DIM="4", HEADWATER_LEARNER_STEP_WAIT_SECONDS="0.5",
                       **extra)


class _Producer:
    """Train batches from four source partitions, one per train-batches partition, with
    offsets increasing within each (as the worker writes them)."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.topic = f"{prefix}train-batches"
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 << 20)
        self.next_offset = [0] * PARTITIONS
        self.sent = 0

    def send(self, messages: int) -> None:
        for _ in range(messages):
            p = self.sent % PARTITIONS
            self.producer.send(self.topic, make_payload(ROWS, self.next_offset[p], seed=self.sent,
                                                        partition=p), partition=p)
            self.next_offset[p] += ROWS
            self.sent += 1
        self.producer.flush()

    def close(self) -> None:
        self.producer.close()


def _members(group: Service) -> list[psutil.Process]:
    return psutil.Process(group.proc.pid).children()


def _rank0_status(client: redis.Redis) -> dict:
    docs = [json.loads(client.get(k)) for k in client.keys("hw:status:learner:*")]
    docs = [d for d in docs if d.get("rank") == 0 and psutil.pid_exists(d["pid"])]
    return max(docs, key=lambda d: d["updated_at"]) if docs else {}


def _latest(store: ModelStore) -> dict:
    versions = store.versions()
    return store.manifest(versions[-1]) if versions else {}


def _check_final(store: ModelStore, producer: _Producer, total_rows: int) -> dict:
    """The last checkpoint covers every row once: the count, the watermarks of every
    source partition and the consumer position of every train-batches partition."""
    latest = store.versions()[-1]
    manifest = store.manifest(latest)
    state = store.load(latest).state
    assert manifest["rows_trained"] == total_rows
    assert manifest["metrics"]["rows_dropped_duplicate"] == 0
    assert manifest["watermarks"] == {
        f"clicks:{p}": {"offset": producer.next_offset[p] - 1, "sub": 1} for p in range(PARTITIONS)
    }
    per_partition = [len(range(p, producer.sent, PARTITIONS)) for p in range(PARTITIONS)]
    assert state["consumer_positions"] == {
        f"{producer.topic}:{p}": per_partition[p] for p in range(PARTITIONS)
    }
    return manifest


def test_learner_group_trains_every_row_exactly_once(kafka_bootstrap, redis_db, tmp_path,
                                                     topic_prefix):
    env = _env(kafka_bootstrap, redis_db, topic_prefix, tmp_path,
               HEADWATER_PUBLISH_EVERY_SECONDS="1")
    producer = _Producer(kafka_bootstrap, topic_prefix)
    producer.send(24)
    total = producer.sent * ROWS
    store = LocalModelStore(tmp_path / "models", "ranker")
    client = redis.Redis.from_url(redis_db)
    group = Service("learner", env, tmp_path / "logs")
    try:
        wait_until(lambda: _latest(store).get("rows_trained") == total, 120, interval=0.2,
                   what="a publication covering every row", on_fail=group.log)
        ranks = wait_until(lambda: {json.loads(client.get(k)).get("rank")
                                    for k in client.keys("hw:status:learner:*")} >= {0, 1}, 10,
                           what="a heartbeat from both members")
        assert ranks
        assert len(_members(group)) == 2
        group.stop()  # the members stop together; rank 0 publishes nothing new
        assert group.proc.returncode == 0, group.log()[-3000:]
        _check_final(store, producer, total)
    finally:
        group.stop()
        producer.close()
        client.close()


def test_learner_group_member_kill9_resumes_from_checkpoint(kafka_bootstrap, redis_db, tmp_path,
                                                            topic_prefix):
    # publications every 4,000 rows only (never by time), so the kill is sure to land
    # while the group holds 3,000 trained rows that no checkpoint covers
    env = _env(kafka_bootstrap, redis_db, topic_prefix, tmp_path,
               HEADWATER_PUBLISH_EVERY_SECONDS="3600", HEADWATER_PUBLISH_EVERY_ROWS="4000")
    producer = _Producer(kafka_bootstrap, topic_prefix)
    store = LocalModelStore(tmp_path / "models", "ranker")
    client = redis.Redis.from_url(redis_db)
    group = Service("learner", env, tmp_path / "logs")
    try:
        producer.send(20)  # 4,000 rows: one publication
        wait_until(lambda: _latest(store).get("rows_trained") == 4000, 120, interval=0.2,
                   what="the first publication", on_fail=group.log)
        producer.send(15)  # 3,000 rows trained, not published
        wait_until(lambda: _rank0_status(client).get("rows_trained") == 7000, 60, interval=0.2,
                   what="the group to train the unpublished rows", on_fail=group.log)
        assert len(store.versions()) == 1
        members = _members(group)
        assert len(members) == 2
        victim = max(members, key=lambda m: m.pid)
        os.kill(victim.pid, 9)
        wait_until(lambda: (len(_members(group)) == 2
                            and victim.pid not in [m.pid for m in _members(group)]), 60,
                   what="the group re-formed", on_fail=group.log)
        producer.send(5)  # 8,000 rows in all: the next publication covers all of them once
        wait_until(lambda: _latest(store).get("rows_trained") == 8000, 120, interval=0.2,
                   what="a publication covering every row after the restart",
                   on_fail=lambda: group.log() + json.dumps(_latest(store)))
        group.stop()
        assert group.proc.returncode == 0, group.log()[-3000:]
        manifest = _check_final(store, producer, 8000)
        assert manifest["rows_trained"] == producer.sent * ROWS
        assert "re-forming the group" in group.log()
    finally:
        group.stop()
        producer.close()
        client.close()
