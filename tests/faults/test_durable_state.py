"""State that used to live in worker memory survives restarts (issue 13, points 4–6).

Real processes on the real broker and a real Redis (AOF) per test: workers are killed
with -9 and restarted, Redis is restored from an older copy of its data.
"""

from __future__ import annotations

import json

import pytest
import redis
from kafka import KafkaProducer

from detection.engine import DetectionEngine
from detection.state_store import state_key
from features.store import SyncOnlineStore
from headwater.settings import Settings
from learner.batch import decode_batch
from streams.audit_path import audit_engine_config
from streams.audit_shipper import ship_audit
from streams.topics import log_ends
from tests.faults.test_worker_faults import _restart_redis, _snapshot
from tests.stackutil import (
    alerts_in_redis,
    read_json_topic,
    read_topic,
    train_event_ids,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

PARTITIONS = 4


def _send(kafka: str, topic: str, partition: int, events: list[dict]) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka)
    producer.send(topic, json.dumps(events).encode(), partition=partition)
    producer.flush()
    producer.close()


def _impressions(url: str, user: str) -> int:
    store = SyncOnlineStore.from_url(url, partitions=PARTITIONS)
    try:
        return int(store.entity_features(f"user:{user}")["impressions_total"])
    finally:
        store.close()


def _dup_letters(kafka: str, prefix: str, event_id: str) -> list[dict]:
    return [d for d in read_json_topic(kafka, f"{prefix}dead-letter")
            if f"duplicate event_id {event_id!r}" in d["reason"]]


def _row_positions(kafka: str, topic: str, event_id: str) -> set[tuple[int, int]]:
    """(source partition, offset) of every row of ``event_id`` on a train-batches topic."""
    out = set()
    for rec in read_topic(kafka, topic):
        batch = decode_batch(rec.value)
        out.update((batch.source_partition, int(o))
                   for e, o in zip(batch.event_ids, batch.offsets, strict=True) if str(e) == event_id)
    return out


def test_duplicate_ids_are_refused_across_a_worker_restart_and_a_gap_reread(stack):
    kafka, prefix, url = stack["kafka"], stack["prefix"], stack["url"]
    clicks, rows = f"{prefix}clicks", f"{prefix}train-batches"
    ev = {"event_id": "dx-1", "ts": 880_000_000, "user_id": "dx-u1", "item_id": "dx-i", "label": 1}
    worker = stack["start_worker"]()
    _send(kafka, clicks, 1, [ev])
    wait_until(lambda: "dx-1" in train_event_ids(kafka, rows), 90, what="the first event's row",
               on_fail=stack["logs"])
    snapshot = _snapshot(stack)  # Redis as it was: dx-1 recorded, nothing after it

    worker.kill9()  # the window is not in the worker: a new one still knows dx-1
    worker = stack["start_worker"]()
    _send(kafka, clicks, 1, [dict(ev, user_id="dx-u2", ts=880_000_100),
                             dict(ev, event_id="dx-2", user_id="dx-u3", ts=880_000_200)])
    wait_until(lambda: _impressions(url, "dx-u3") == 1, 90, what="the event after the duplicate",
               on_fail=stack["logs"])
    letters = wait_until(lambda: _dup_letters(kafka, prefix, "dx-1"), 30,
                         what="the duplicate's dead letter", on_fail=stack["logs"])
    assert len(letters) == 1 and "first seen at offset 0" in letters[0]["reason"], letters
    assert _impressions(url, "dx-u2") == 0

    # Redis loses everything after the snapshot: the worker re-reads the gap from the
    # broker, the duplicate in it is refused again (the window kept dx-1's first position)
    # and the event after it is counted again, once.
    _restart_redis(stack, "redis3.log", restore_from=snapshot)
    assert _impressions(url, "dx-u3") == 0
    wait_until(lambda: _impressions(url, "dx-u3") == 1, 90, what="the gap re-read",
               on_fail=stack["logs"])
    assert "re-reading the gap" in worker.log()
    assert _impressions(url, "dx-u2") == 0 and _impressions(url, "dx-u1") == 1
    # dx-1's rows (a replay after kill -9 re-emits the same row) all come from offset 0
    assert _row_positions(kafka, rows, "dx-1") == {(1, 0)}
    assert len(_dup_letters(kafka, prefix, "dx-1")) == 1  # a re-read does not dead-letter twice


def _state_next(client, topic: str, partition: int) -> int | None:
    raw = client.hget(state_key(topic, partition), "_next")
    return int(raw) if raw is not None else None


def _all_applied(client, kafka: str, topic: str) -> bool:
    """Every audit message on the broker is covered by stored detection state."""
    ends = log_ends(kafka, topic, range(PARTITIONS))
    return all((_state_next(client, topic, p) or 0) == end for p, end in ends.items())


def test_detection_state_survives_kill_9_mid_attack(stack, data_dir, tmp_path):
    """Killed with -9 in the middle of an attack log, a worker resumes the host's graph
    and alert chains: the alerts at the end are exactly those of one uninterrupted run
    (same ids, severities, versions), one growing alert per chain, no duplicate."""
    kafka, prefix, url = stack["kafka"], stack["prefix"], stack["url"]
    settings = Settings(topic_prefix=prefix, partitions=PARTITIONS)
    topic = settings.topics["audit"]
    client = redis.Redis.from_url(url)
    host = f"vm-dur-{prefix[:-1]}"
    lines = (data_dir / "audit" / "dev03_ingress_revshell.log").read_text(encoding="utf-8").splitlines(True)
    split = int(len(lines) * 0.6)  # the attack chain's alert exists, still low, before it

    reference = DetectionEngine(host=host, config=audit_engine_config(settings))
    reference.process_lines(lines[:split])
    before = {a["id"]: a for a in reference.alerts()}
    reference.process_lines(lines[split:])
    expected = {a["id"]: a for a in reference.alerts()}
    chain = [i for i, a in expected.items() if a["severity"] == "high"]
    assert len(chain) == 1 and before[chain[0]]["severity"] == "low"  # the chain spans the kill

    log = tmp_path / "audit.log"
    log.write_text("".join(lines[:split]), encoding="utf-8")
    worker = stack["start_worker"]()
    ship_audit(settings, kafka, log, host, tmp_path / "pos", max_lines=100)
    wait_until(lambda: _all_applied(client, kafka, topic), 90, what="the first part applied",
               on_fail=stack["logs"])
    worker.kill9()
    with log.open("a", encoding="utf-8") as f:
        f.write("".join(lines[split:]))
    worker = stack["start_worker"]()
    ship_audit(settings, kafka, log, host, tmp_path / "pos", max_lines=100)
    wait_until(lambda: _all_applied(client, kafka, topic), 90, what="the rest applied",
               on_fail=stack["logs"])

    stored = {a["id"]: a for a in alerts_in_redis(url, host, "low")}
    assert set(stored) == set(expected)
    for aid, alert in expected.items():
        got = stored[aid]
        assert (got["severity"], got["version"], got["techniques"]) == \
            (alert["severity"], alert["version"], alert["techniques"]), aid
    published = [a for a in read_json_topic(kafka, f"{prefix}alerts") if a["host"] == host]
    assert {a["id"] for a in published} == set(expected)
    newest = {}
    for a in published:
        newest[a["id"]] = max(newest.get(a["id"], 0), a["version"])
    assert newest == {aid: a["version"] for aid, a in expected.items()}
    assert "resumed its detection state" in worker.log()
    client.close()
