"""Duplicate event ids and poison messages: refused to dead-letter, never a stalled stream."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from kafka import KafkaProducer

from streams.click_path import RecentIds
from tests.stackutil import read_json_topic, train_event_ids, wait_until


def test_recent_ids_tell_replays_from_duplicates():
    recent = RecentIds(capacity=3)
    off = np.array([10, 10, 11])
    sub = np.array([0, 1, 0])
    assert recent.duplicates(0, ["a", "b", "a"], off, sub).tolist() == [False, False, True]
    # The same message replayed after a crash is not a duplicate of itself.
    assert recent.duplicates(0, ["a", "b"], off[:2], sub[:2]).tolist() == [False, False]
    # Partitions are independent; capacity bounds memory (oldest forgotten first).
    assert recent.duplicates(1, ["a"], np.array([5]), np.array([0])).tolist() == [False]
    recent.duplicates(0, ["c", "d"], np.array([12, 13]), np.array([0, 0]))
    assert recent.duplicates(0, ["a"], np.array([99]), np.array([0])).tolist() == [False]


def test_poison_message_is_isolated_and_dead_lettered():
    from streams import app as app_mod

    calls = []

    async def handler(topic, partition, messages):
        calls.append([m[0] for m in messages])
        if any(m[2] == b"poison" for m in messages):
            raise ValueError("cannot handle this")
        return [("out", None, m[2], None) for m in messages]

    # Drive the agent's handle/isolate logic through a minimal fake app registration.
    captured = {}

    class FakeApp:
        def topic(self, *a, **k):
            return "t"

        def agent(self, topic, name):
            def register(fn):
                captured["agent"] = fn
                return fn
            return register

    app_mod.batched_agent(FakeApp(), "clicks", 1, handler, 10, 0.01, "clicks",
                          dead_letter_topic="dlq")
    sent = []

    async def fake_send_all(app, sends, on_error):
        sent.extend(sends)

    class Msg:
        def __init__(self, offset, value):
            self.partition, self.offset, self.key, self.value = 0, offset, None, value

    class Ev:
        def __init__(self, offset, value):
            self.message = Msg(offset, value)

    class Stream:
        def take_events(self, n, within):
            async def gen():
                yield [Ev(1, b"ok1"), Ev(2, b"poison"), Ev(3, b"ok3")]
            return gen()

    orig_send, orig_sleep = app_mod.send_all, asyncio.sleep
    app_mod.send_all = fake_send_all

    async def no_sleep(_):
        return None

    app_mod.asyncio.sleep = no_sleep
    try:
        asyncio.run(captured["agent"](Stream()))
    finally:
        app_mod.send_all = orig_send
        app_mod.asyncio.sleep = orig_sleep
    assert [s[2] for s in sent if s[0] == "out"] == [b"ok1", b"ok3"]
    dead = [json.loads(s[2]) for s in sent if s[0] == "dlq"]
    assert len(dead) == 1 and dead[0]["offset"] == 2
    assert "internal error" in dead[0]["reason"] and "cannot handle this" in dead[0]["reason"]
    assert calls[: app_mod.POISON_AFTER] == [[1, 2, 3]] * app_mod.POISON_AFTER


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
