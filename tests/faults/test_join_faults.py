"""The joiner with real processes on the real broker and Redis: exactly one row per
impression through worker kill -9 with windows open, out-of-order, duplicate and late
actions, and windows closing by the watermark (event time, then the idle clock)."""

from __future__ import annotations

import base64
import collections
import json
import time

import pytest
from kafka import KafkaProducer, TopicPartition

from core import kafka as kafka_clients
from core.settings import Settings
from features.defaults import row_builder
from learner.batch import decode_batch
from streams.replay import partition_of
from tests.stackutil import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

PARTITIONS = 4
N_REQUESTS = 240
WINDOW = 5.0
JOIN_ENV = {"HEADWATER_JOIN": 1, "HEADWATER_JOIN_WINDOW_SECONDS": WINDOW, "HEADWATER_JOIN_LATENESS_SECONDS": 1,
            "HEADWATER_JOIN_IDLE_SECONDS": 2}


def scenario(schema):
    """Impressions (3 candidates each) and actions with the labels they must produce.

    Every 3rd request's first candidate is clicked 2 s after it was shown; every 4th
    request's click is sent twice; every 7th request's second candidate is clicked 15 s
    after (outside the window: late, its label stays 0).
    """
    base = time.time() - 1800
    imps, acts, labels, late = [], [], {}, set()
    f, d = len(schema.categorical), len(schema.dense)
    for i in range(N_REQUESTS):
        rid, user, ts = f"r{i}", f"u{i % 37}", base + i * 0.25
        items = [f"i{(i + k) % 50}" for k in range(3)]
        imps.append({"request_id": rid, "ts": ts, "user_id": user, "model_version": "baseline",
                     "schema_hash": schema.hash,
                     "candidates": [{"item_id": it, "position": k, "score": 0.1} for k, it in enumerate(items)],
                     "categorical": [[i * 10 + k + j + 1 for j in range(f)] for k in range(3)],
                     "dense": [[float(k)] * d for k in range(3)]})
        for k in range(3):
            labels[f"{rid}:{k}"] = 0
        if i % 3 == 0:
            labels[f"{rid}:0"] = 1
            click = {"event_id": f"a{i}", "ts": ts + 2, "user_id": user, "item_id": items[0],
                     "request_id": rid}
            acts += [click, click] if i % 4 == 0 else [click]
        if i % 7 == 0:
            late.add(f"late{i}")
            acts.append({"event_id": f"late{i}", "ts": ts + 15, "user_id": user, "item_id": items[1],
                         "request_id": rid})
    # a producer logs actions as they happen: in time order (out of order across topics)
    acts.sort(key=lambda a: a["ts"])
    return imps, acts, labels, late


def produce(kafka: str, topic: str, events: list[dict]) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka, linger_ms=5)
    parts = partition_of([e["user_id"] for e in events], PARTITIONS)
    for ev, p in zip(events, parts, strict=True):
        producer.send(topic, json.dumps(ev).encode(), key=str(ev["user_id"]).encode(), partition=int(p))
    producer.flush()
    producer.close()


def read_all(kafka: str, topic: str, quiet: float = 0.6) -> list:
    consumer = kafka_clients.consumer(kafka, enable_auto_commit=False, fetch_max_wait_ms=50)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out, last = [], time.monotonic()
        while time.monotonic() - last < quiet:
            got = consumer.poll(timeout_ms=200)
            for records in got.values():
                out.extend(records)
                last = time.monotonic()
        return out
    finally:
        consumer.close()


def joined_rows(kafka: str, prefix: str) -> dict[str, tuple[int, int, int]]:
    """event id -> (label, row sequence, source partition); every copy of a row must agree."""
    out: dict[str, tuple[int, int, int]] = {}
    for rec in read_all(kafka, f"{prefix}train-batches"):
        b = decode_batch(rec.value)
        if not b.source_topic.startswith("joined:"):
            continue
        for eid, label, seq in zip(map(str, b.event_ids), b.labels.tolist(), b.offsets.tolist(), strict=True):
            row = (label, seq, b.source_partition)
            assert out.setdefault(eid, row) == row, f"{eid} sent with two different rows"
    return out


def test_every_impression_becomes_exactly_one_row_through_kill_9(stack):
    schema = row_builder(Settings(content_encoder="hashing")).schema
    imps, acts, labels, late = scenario(schema)
    prefix, kafka = stack["prefix"], stack["kafka"]
    half = N_REQUESTS // 2
    # split the action log by time, as it was written: up to the second half's first impression
    first_acts = [a for a in acts if a["ts"] < imps[half]["ts"]]
    second_acts = [a for a in acts if a["ts"] >= imps[half]["ts"]]
    # the first worker never sees its partitions idle (60 s): its watermark moves by event
    # time only, so windows are still open when it dies
    worker = stack["start_worker"](**dict(JOIN_ENV, HEADWATER_JOIN_IDLE_SECONDS=60))
    produce(kafka, f"{prefix}impressions", imps[:half])
    produce(kafka, f"{prefix}actions", first_acts)
    wait_until(lambda: len(joined_rows(kafka, prefix)) > 30, 90, what="first joined rows",
               on_fail=worker.log)
    # windows are open (the newest impressions wait for the watermark) when the worker dies
    worker.kill9()
    produce(kafka, f"{prefix}actions", second_acts)  # actions before their impressions: held
    produce(kafka, f"{prefix}impressions", imps[half:])
    worker = stack["start_worker"](**JOIN_ENV)
    wait_until(lambda: len(joined_rows(kafka, prefix)) >= len(labels), 120,
               what="a row for every impression", on_fail=stack["logs"])
    rows = joined_rows(kafka, prefix)
    dead = [json.loads(r.value) for r in read_all(kafka, f"{prefix}dead-letter")]
    wrong = {k: (v[0], labels[k]) for k, v in rows.items() if v[0] != labels.get(k)}
    why = {json.loads(base64.b64decode(d["original"])).get("event_id"): d["reason"] for d in dead
           if d["source_topic"] == f"{prefix}actions"}
    assert not wrong and rows.keys() == labels.keys(), (
        list(wrong.items())[:5], [why.get(f"a{k.split(':')[0][1:]}") for k in list(wrong)[:5]])
    # row sequence numbers: one per row per join partition, no gaps, none reused
    seqs = collections.defaultdict(list)
    for _label, seq, p in rows.values():
        seqs[p].append(seq)
    for p, s in seqs.items():
        assert sorted(s) == list(range(len(s))), f"partition {p} sequence has gaps or repeats"
    late_seen = set()
    for d in dead:
        if d["source_topic"] == f"{prefix}actions":
            original = base64.b64decode(d["original"])
            late_seen.add(json.loads(original)["event_id"])
    assert late_seen == late
    # the online counters: every impression once, every matched click once, through kill -9
    import redis

    from features.store import SyncOnlineStore

    counters = row_builder(Settings(content_encoder="hashing")).config.counters
    client = redis.Redis.from_url(stack["url"])
    store = SyncOnlineStore(client, partitions=PARTITIONS, counters=counters)
    want: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for imp in imps:
        for c in imp["candidates"]:
            label = labels[f"{imp['request_id']}:{c['position']}"]
            for e in (f"item:{c['item_id']}", f"user:{imp['user_id']}"):
                want[e][0] += 1
                want[e][1] += label
    got = {}
    for e in want:
        doc = store.entity_features(e)
        got[e] = [doc["impressions_total"], doc["clicks_total"]]
    client.close()
    assert got == dict(want)
