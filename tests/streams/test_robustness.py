"""Duplicate event ids and poison messages: refused to dead-letter, never a stalled stream."""

from __future__ import annotations

import asyncio
import json

import pytest
from kafka import KafkaProducer

from headwater.testing import AgentHarness, ManualClock
from streams.events import MemoryLog
from tests.stackutil import read_json_topic, train_event_ids, wait_until


def test_poison_message_is_isolated_and_dead_lettered():
    from streams import app as app_mod

    calls = []

    async def handler(topic, partition, messages):
        calls.append([m[0] for m in messages])
        if any(m[2] == b"poison" for m in messages):
            raise ValueError("cannot handle this")
        return [("out", None, m[2], None) for m in messages]

    harness, sink, clock = AgentHarness(), MemoryLog(), ManualClock(0.0)
    app_mod.batched_agent(harness, "clicks", 1, handler, 10, 0.01, "clicks",
                          dead_letter_topic="dlq", sink=sink, sleep=clock.sleep)
    asyncio.run(harness.feed("clicks", [[(0, 1, None, b"ok1"), (0, 2, None, b"poison"),
                                         (0, 3, None, b"ok3")]]))
    assert sink.messages("out") == [b"ok1", b"ok3"]
    dead = [json.loads(v) for v in sink.messages("dlq")]
    assert len(dead) == 1 and dead[0]["offset"] == 2
    assert "internal error" in dead[0]["reason"] and "cannot handle this" in dead[0]["reason"]
    assert calls[: app_mod.POISON_AFTER] == [[1, 2, 3]] * app_mod.POISON_AFTER
    assert calls[app_mod.POISON_AFTER:] == [[1], [2], [3]], "then message by message"
    # Backed off between the whole batch's attempts (0.5 s more each time), not after
    # the last: a non-transient error is isolated, never retried forever.
    assert clock.slept == [0.5 * a for a in range(1, app_mod.POISON_AFTER)]


@pytest.mark.integration
def test_duplicate_event_id_goes_to_dead_letter_and_is_counted_once(worker):
    kafka, prefix = worker["kafka"], worker["prefix"]
    producer = KafkaProducer(bootstrap_servers=kafka)
    ev = {"event_id": "dup-1", "ts": 880_000_000, "user_id": "dup-user", "item_id": "i9", "label": 1}
    producer.send(f"{prefix}clicks", json.dumps(ev).encode(), partition=2)
    producer.send(f"{prefix}clicks", json.dumps([dict(ev, label=0), dict(ev, event_id="dup-2")]).encode(),
                  partition=2)
    producer.flush()
    producer.close()

    ids = wait_until(lambda: (r := train_event_ids(kafka, f"{prefix}train-batches")) and "dup-2" in r and r, 60, what="rows",
                     on_fail=worker["svc"].log)
    assert ids.count("dup-1") == 1
    dead = wait_until(lambda: [d for d in read_json_topic(kafka, f"{prefix}dead-letter")
                               if "duplicate event_id 'dup-1'" in d["reason"]], 30,
                      what="the duplicate's dead letter")
    assert len(dead) == 1 and dead[0]["partition"] == 2
