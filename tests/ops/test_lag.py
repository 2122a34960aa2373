"""LagMonitor against the real broker: a group that consumes, stops, falls behind,
stalls and catches up, with the status each phase gets from the rules."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from serving.lag import LagMonitor

pytestmark = pytest.mark.integration

SESSION_MS = 2000  # Tansu holds a join for half the session: ~1 s


@pytest.fixture
def topic(kafka_bootstrap, topic_prefix):
    name = f"{topic_prefix}lag"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(name, 2, 1)])
    admin.close()
    return name


def produce(bootstrap: str, topic: str, n: int) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i in range(n):
        p.send(topic, b"x" * 20, partition=i % 2)
    p.flush()
    p.close()


def join(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      session_timeout_ms=SESSION_MS, heartbeat_interval_ms=300,
                      fetch_max_wait_ms=20)
    deadline = time.monotonic() + 15
    while not c.assignment() and time.monotonic() < deadline:
        c.poll(100)
    assert c.assignment(), "the consumer did not join its group"
    return c


def drain(c: KafkaConsumer, expected_end: dict[int, int]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        c.poll(100)
        if all(c.position(tp) >= expected_end[tp.partition] for tp in c.assignment()):
            c.commit()
            return
    raise AssertionError("the consumer did not reach the log end")


def part(report, group):
    (g,) = [g for g in report["groups"] if g["group"] == group]
    return g, {p["partition"]: p for p in g["partitions"]}


def test_lag_rises_when_stopped_and_status_follows_the_rules(kafka_bootstrap, topic, topic_prefix):
    group = f"{topic_prefix}g"
    bs = kafka_bootstrap
    produce(bs, topic, 10)
    c = join(bs, topic, group)
    drain(c, {0: 5, 1: 5})
    c.close()

    with LagMonitor(bs, groups=[group], window=3) as mon:
        # Caught up: lag 0 (the log end is read right although Tansu's ListOffsets is
        # behind after batched produces), OK.
        for _ in range(3):
            g, rows = part(mon.sample(), group)
        assert [rows[p]["committed"] for p in (0, 1)] == [5, 5]
        assert [rows[p]["log_end"] for p in (0, 1)] == [5, 5]
        assert g["status"] == "OK" and g["lag"] == 0
        assert rows[0]["lag_seconds"] == 0.0

        # Consumer gone, producers go on: lag rises; the window still holds a zero-lag
        # sample for two rounds (OK), then offsets frozen + lag > 0 + no member = STOP.
        statuses, lags = [], []
        for _ in range(3):
            produce(bs, topic, 10)
            time.sleep(0.2)
            g, rows = part(mon.sample(), group)
            statuses.append(g["status"])
            lags.append(g["lag"])
        assert lags == [10, 20, 30]
        assert statuses == ["OK", "OK", "STOP"]
        assert all(rows[p]["status"] == "STOP" for p in (0, 1))
        assert g["members"] == 0
        assert rows[0]["lag_seconds"] > 0.3  # 5 was the log end before the first round

        # Offsets committed forward (by a tool, no member) but slower than producers:
        # lag grows on every sample -> WARNING.
        committer = KafkaConsumer(bootstrap_servers=bs, group_id=group, enable_auto_commit=False)
        committed = 5
        for _ in range(3):
            committed += 2
            committer.commit({TopicPartition(topic, p): OffsetAndMetadata(committed, "", -1)
                              for p in (0, 1)})
            produce(bs, topic, 10)
            g, rows = part(mon.sample(), group)
        committer.close()
        assert [rows[p]["committed"] for p in (0, 1)] == [11, 11]
        assert g["status"] == "WARNING", g

        # A live member that does not move (paused): STALL, not STOP.
        c = join(bs, topic, group)
        c.pause(*c.assignment())
        for _ in range(3):
            produce(bs, topic, 4)
            c.poll(50)
            g, rows = part(mon.sample(), group)
        assert g["members"] == 1
        assert g["status"] == "STALL", g

        # Back to work: consumes to the end and commits -> lag 0, OK.
        c.resume(*c.assignment())
        end = {p: rows[p]["log_end"] for p in (0, 1)}
        drain(c, end)
        g, rows = part(mon.sample(), group)
        c.close()
        assert g["lag"] == 0 and g["status"] == "OK"
        assert all(rows[p]["lag_seconds"] == 0.0 and rows[p]["status"] == "OK" for p in (0, 1))
        assert end == {0: 41, 1: 41}  # 5 + 15 + 15 + 6 records per partition


def test_lists_every_group_with_committed_offsets(kafka_bootstrap, topic, topic_prefix):
    produce(kafka_bootstrap, topic, 4)
    groups = [f"{topic_prefix}a", f"{topic_prefix}b"]
    for i, gid in enumerate(groups):
        k = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=gid, enable_auto_commit=False)
        k.commit({TopicPartition(topic, 0): OffsetAndMetadata(i, "", -1)})
        k.close()
    with LagMonitor(kafka_bootstrap) as mon:
        report = mon.sample()
    found = {g["group"]: g for g in report["groups"] if g["group"] in groups}
    assert set(found) == set(groups)
    assert [found[g]["partitions"][0]["lag"] for g in groups] == [2, 1]
    assert report["ts"] > 0 and report["window"] == 10
