"""The learner loop against a real broker: consume, train, publish to model-updates, resume."""

import json
import threading
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from learner.kafka_loop import LearnerLoop
from learner.trainer import TrainerSettings
from tests.learner.synth import TINY_HEAD, make_payload

pytestmark = pytest.mark.integration

SETTINGS = TrainerSettings(head=TINY_HEAD, embedding={"buckets": 64}, lr=1e-2)


def wait_for(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def wait_for_value(fn, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s")


def fresh_topics(bootstrap, tag):
    """A unique prefix and its one-partition train-batches and model-updates topics."""
    prefix = f"{tag}{uuid.uuid4().hex[:8]}-"
    topics = {name: f"{prefix}{name}" for name in ("train-batches", "model-updates")}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topics["train-batches"], 1, 1),
                         NewTopic(topics["model-updates"], 1, 1)])
    admin.close()
    return prefix, topics


def start(loop):
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    return t


def test_loop_trains_publishes_and_resumes(kafka_bootstrap, topic_prefix, tmp_path):
    topics = {n: topic_prefix + n for n in ("train-batches", "model-updates")}
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics(
        [NewTopic(topics["train-batches"], 2, 1), NewTopic(topics["model-updates"], 1, 1)]
    )
    admin.close()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for p in (0, 1):
        for i in range(2):
            producer.send(
                topics["train-batches"],
                key=str(p).encode(),
                partition=p,
                value=make_payload(32, offset=32 * i, seed=i, partition=p),
            )
    producer.flush()

    # one step per message, as before accumulation: this test is about publish and resume
    loop = LearnerLoop(kafka_bootstrap, topics, tmp_path, publish_every_seconds=0.2,
                       step_rows=1, step_wait_seconds=0)
    t = start(loop)
    assert wait_for(
        lambda: loop.service.trainer is not None and loop.service.trainer.rows_trained == 128
    )
    loop.stop()
    t.join(30)
    assert not t.is_alive()
    version = loop.service.version
    assert version is not None

    consumer = KafkaConsumer(
        topics["model-updates"],
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        fetch_max_wait_ms=50,
    )
    messages = list(consumer)
    consumer.close()
    assert {m.key for m in messages} == {b"ranker"}
    updates = [json.loads(m.value) for m in messages]
    assert updates and updates[-1]["version"] == version and updates[-1]["path"].endswith(version)
    assert updates[-1]["model"] == "ranker" and updates[-1]["rows_trained"] == 128

    # restart: seeks to the checkpointed positions, so nothing is re-read, then trains new rows
    producer.send(topics["train-batches"], partition=0, value=make_payload(32, offset=64, seed=9))
    producer.flush()
    producer.close()
    loop2 = LearnerLoop(kafka_bootstrap, topics, tmp_path, publish_every_seconds=0.2,
                        step_rows=1, step_wait_seconds=0)
    assert loop2.service.trainer.rows_trained == 128
    t2 = start(loop2)
    assert wait_for(lambda: loop2.service.trainer.rows_trained == 160)
    loop2.stop()
    t2.join(30)
    assert loop2.service.trainer.rows_dropped["duplicate"] == 0
    assert loop2.service.status()["watermarks"]["clicks:0"] == {"offset": 95, "sub": 1}


def test_learner_backlog_shows_in_the_lag_report(kafka_bootstrap, tmp_path):
    """With a lag group the learner commits its *trained* positions, so `headwater lag`
    reports its backlog like the worker's: lag > 0 while rows wait, 0 once trained."""
    from serving.lag import LagMonitor

    prefix, topics = fresh_topics(kafka_bootstrap, "lag")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for i in range(3):
        producer.send(topics["train-batches"], partition=0,
                      value=make_payload(32, offset=32 * i, seed=i))
    producer.flush()
    producer.close()
    group = f"{prefix}learner"
    # rows wait for a full step that never comes (no deadline): nothing may be committed
    loop = LearnerLoop(kafka_bootstrap, topics, tmp_path, publish_every_seconds=None,
                       lag_group=group, step_rows=1000, step_wait_seconds=3600)
    t = start(loop)
    assert wait_for(lambda: loop.service.pending_rows == 96)
    with LagMonitor(kafka_bootstrap, groups=[group]) as mon:
        report = mon.sample()
        assert not any(g["partitions"] for g in report["groups"]), "nothing trained: no commit"
        loop.service.flush()

        def caught_up():
            groups = mon.sample()["groups"]
            return groups and groups[0]["partitions"] and groups[0]["lag"] == 0 and groups[0]

        row = wait_for_value(caught_up)
        assert row["group"] == group and row["partitions"][0]["committed"] == 3
    loop.stop()
    t.join(30)


def test_messages_past_the_staleness_bound_are_skipped_not_trained(kafka_bootstrap, tmp_path):
    """A learner far behind skips messages written longer ago than the bound (counted as
    stale, their positions and watermarks advanced), and trains the fresh ones."""
    prefix, topics = fresh_topics(kafka_bootstrap, "stale")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    hour_ago = int((time.time() - 3600) * 1000)
    for i in range(2):
        producer.send(topics["train-batches"], partition=0, timestamp_ms=hour_ago,
                      value=make_payload(32, offset=32 * i, seed=i))
    producer.send(topics["train-batches"], partition=0, value=make_payload(32, offset=64, seed=2))
    producer.flush()
    producer.close()
    loop = LearnerLoop(kafka_bootstrap, topics, tmp_path, publish_every_seconds=None,
                       max_staleness_seconds=60, step_rows=32, step_wait_seconds=0)
    t = start(loop)
    assert wait_for(lambda: loop.service.trainer is not None
                    and loop.service.trainer.rows_trained == 32)
    loop.stop()
    t.join(30)
    tr = loop.service.trainer
    assert tr.rows_dropped["stale"] == 64 and tr.rows_trained == 32
    assert tr.metrics.rows == 32, "skipped rows are not scored either"
    assert loop.service.consumer_positions == {f"{topics['train-batches']}:0": 3}
    assert tr.watermarks_json() == {"clicks:0": {"offset": 95, "sub": 1}}


def test_a_slow_stream_makes_one_step_per_deadline_not_one_per_message(kafka_bootstrap, tmp_path):
    """Messages trickling in one at a time through the real loop wait for each other: the
    step runs when the oldest has waited ``step_wait_seconds`` (the loop's tick after an
    empty poll), with every row received by then, as one optimizer step."""
    _, topics = fresh_topics(kafka_bootstrap, "slow")
    now = [1000.0]
    loop = LearnerLoop(kafka_bootstrap, topics, tmp_path, settings=SETTINGS,
                       publish_every_seconds=None, step_rows=256, step_wait_seconds=2.0)
    loop.service.clock = lambda: now[0]  # the deadline moves only when the test says so
    t = start(loop)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for i in range(3):
        producer.send(topics["train-batches"], partition=0,
                      value=make_payload(10, offset=10 * i, seed=i)).get(60)
        # the first wait includes the loop's start (consumer, assignment, building the
        # model): minutes on a saturated 2-core machine; the frozen clock keeps it race-free
        assert wait_for(lambda i=i: loop.service.pending_rows == 10 * (i + 1), timeout=180)
        now[0] += 0.5  # 1.5 s in all: before the deadline
    producer.close()
    assert loop.service.trainer.rows_trained == 0 and loop.service.trainer.batches == 0
    now[0] += 0.5  # the oldest message has now waited 2 s
    assert wait_for(lambda: loop.service.trainer.rows_trained == 30)
    assert loop.service.trainer.batches == 1, "three slow messages, one step"
    assert loop.service.pending_rows == 0
    loop.stop()
    t.join(30)
