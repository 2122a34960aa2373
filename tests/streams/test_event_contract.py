"""One contract suite for the event log the worker reads back (streams/events.py): the
Kafka log on the real broker (through the project's client factory) and the memory log."""

from __future__ import annotations

import pytest
from kafka.admin import NewTopic

from core import kafka as kafka_clients
from streams.events import EventLog, EventSink, KafkaLog, MemoryLog


class KafkaSide:
    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        admin = kafka_clients.admin(bootstrap)
        try:
            admin.create_topics([NewTopic(topic, 2, 1)])
        finally:
            admin.close()
        self.log = KafkaLog(bootstrap, timeout=1.5)
        self.producer = kafka_clients.producer(bootstrap, acks="all")

    def append(self, partition: int, value: bytes, key: bytes | None = None) -> None:
        self.producer.send(self.topic, value, key=key, partition=partition).get(timeout=30)

    def commit(self, group: str, partition: int, offset: int) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        consumer = kafka_clients.consumer(self.bootstrap, group_id=group, enable_auto_commit=False)
        try:
            consumer.commit({TopicPartition(self.topic, partition): OffsetAndMetadata(offset, "", -1)})
        finally:
            consumer.close()

    def close(self) -> None:
        self.producer.close()


class MemorySide:
    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.log = MemoryLog()

    def append(self, partition: int, value: bytes, key: bytes | None = None) -> None:
        self.log.append(self.topic, partition, value, key=key)

    def commit(self, group: str, partition: int, offset: int) -> None:
        self.log.commit(group, self.topic, partition, offset)

    def close(self) -> None:
        pass


@pytest.fixture(params=["kafka", "memory"])
def side(request, topic_prefix):
    topic = f"{topic_prefix}events"
    if request.param == "kafka":
        made = KafkaSide(request.getfixturevalue("kafka_bootstrap"), topic)
    else:
        made = MemorySide(topic)
    yield made
    made.close()


def test_reads_back_a_range_by_offset_with_keys(side):
    assert isinstance(side.log, EventLog)
    for i in range(5):
        side.append(1, f"v{i}".encode(), key=f"k{i}".encode() if i % 2 else None)
    side.append(0, b"other partition")
    assert side.log.read_range(side.topic, 1, 1, 4) == [(1, b"k1", b"v1"), (2, None, b"v2"),
                                                        (3, b"k3", b"v3")]
    assert side.log.read_range(side.topic, 1, 2, 2) == []
    assert side.log.read_range(side.topic, 0, 0, 1) == [(0, None, b"other partition")]


def test_log_end_is_the_next_offset(side):
    assert side.log.log_end(side.topic, 0) == 0
    for i in range(3):
        side.append(0, b"x%d" % i)
    assert side.log.log_end(side.topic, 0) == 3
    assert side.log.log_end(side.topic, 1) == 0


def test_a_range_past_the_end_is_an_error_not_a_short_answer(side):
    side.append(0, b"only")
    with pytest.raises(TimeoutError):
        side.log.read_range(side.topic, 0, 0, 2)


def test_committed_offsets_per_group(side):
    for i in range(3):
        side.append(0, b"x%d" % i)
    assert side.log.committed("g1", side.topic, [0, 1]) == {0: 0, 1: 0}
    side.commit("g1", 0, 2)
    assert side.log.committed("g1", side.topic, [0, 1]) == {0: 2, 1: 0}
    assert side.log.committed("g2", side.topic, [0]) == {0: 0}


def test_the_memory_sink_appends_what_it_is_sent():
    import asyncio

    log = MemoryLog()
    assert isinstance(log, EventSink)
    asyncio.run(log.send([("t", b"k", b"a", 1), ("t", None, b"b", None)]))
    assert log.read_range("t", 1, 0, 1) == [(0, b"k", b"a")] and log.messages("t", 0) == [b"b"]
