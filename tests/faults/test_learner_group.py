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

from core.health import read_all_sync
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
        self.messages = [0] * PARTITIONS
        self.sent = 0

    def send(self, messages: int, only: int | None = None) -> None:
        for _ in range(messages):
            p = self.sent % PARTITIONS if only is None else only
            self.producer.send(self.topic, make_payload(ROWS, self.next_offset[p], seed=self.sent,
                                                        partition=p), partition=p)
            self.next_offset[p] += ROWS
            self.messages[p] += 1
            self.sent += 1
        self.producer.flush()

    def close(self) -> None:
        self.producer.close()


def _members(group: Service) -> list[psutil.Process]:
    return psutil.Process(group.proc.pid).children()


def _rank0_status(client: redis.Redis) -> dict:
    # the product's reader: a heartbeat that expires between listing and reading is skipped
    docs = [d for d in read_all_sync(client) if d.get("service") == "learner"]
    docs = [d for d in docs if d.get("rank") == 0 and psutil.pid_exists(d["pid"])]
    return max(docs, key=lambda d: d["updated_at"]) if docs else {}


def _rank0_rows_metric(port: str) -> float:
    """``headwater_learner_rows_trained_total`` from the group's one /metrics endpoint."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("headwater_learner_rows_trained_total "):
                return float(line.split()[1])
    return 0.0


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
    assert state["consumer_positions"] == {
        f"{producer.topic}:{p}": producer.messages[p] for p in range(PARTITIONS)
    }
    return manifest


def test_learner_group_trains_every_row_exactly_once(kafka_bootstrap, redis_db, tmp_path,
                                                     topic_prefix):
    env = _env(kafka_bootstrap, redis_db, topic_prefix, tmp_path,
               HEADWATER_PUBLISH_EVERY_SECONDS="1")
    producer = _Producer(kafka_bootstrap, topic_prefix)
    producer.send(24)
    store = LocalModelStore(tmp_path / "models", "ranker")
    client = redis.Redis.from_url(redis_db)
    group = Service("learner", env, tmp_path / "logs")
    try:
        # then rows on one partition at a time, each batch once the group has trained all
        # before it: whichever member owns that partition, the other one's are dry and it
        # steps with no rows of its own (the group's rows must still count on rank 0)
        for only in (None, 0, PARTITIONS - 1):
            if only is not None:
                producer.send(3, only=only)
            total = sum(producer.next_offset)
            wait_until(lambda t=total: _latest(store).get("rows_trained") == t, 120, interval=0.2,
                       what=f"a publication covering every row (to {total})", on_fail=group.log)
        ranks = wait_until(lambda: {json.loads(client.get(k)).get("rank")
                                    for k in client.keys("hw:status:learner:*")} >= {0, 1}, 10,
                           what="a heartbeat from both members")
        assert ranks
        assert len(_members(group)) == 2
        # rank 0's /metrics counts the whole group's rows, also those of steps it had no
        # rows for (it once stalled below the total when its partitions ran dry first)
        wait_until(lambda: _rank0_rows_metric(env["HEADWATER_LEARNER_PORT"]) == total, 10,
                   interval=0.2, what="rank 0's rows_trained counter at the group's total",
                   on_fail=lambda: str(_rank0_rows_metric(env["HEADWATER_LEARNER_PORT"])))
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
        # one full checkpoint, and (deltas are on by default) rank 0 publishes the group's
        # rows since then as a delta on it: every member's rows and watermarks
        assert [v for v in store.versions() if store.kind(v)[0] == "full"] == ["000001"]
        delta = wait_until(lambda: _latest(store) if _latest(store).get("rows_trained") == 7000
                           else None, 30, interval=0.2, what="a delta covering the group's rows",
                           on_fail=lambda: group.log() + json.dumps(_latest(store)))
        assert (delta["kind"], delta["base"]) == ("delta", "000001")
        assert delta["base_sha256"] == store.manifest("000001")["sha256"]
        assert delta["watermarks"] == {
            f"clicks:{p}": {"offset": producer.next_offset[p] - 1, "sub": 1}
            for p in range(PARTITIONS)
        }
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
