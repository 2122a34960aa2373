"""State that used to live in worker memory survives restarts (issue 13, points 4–6).

Real processes on the real broker and a real Redis (AOF) per test: workers are killed
with -9 and restarted, Redis is restored from an older copy of its data.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import redis
from kafka import KafkaProducer

from core.settings import Settings
from detection.engine import DetectionEngine
from detection.state_store import state_key
from features.codebook_store import CodebookStore
from features.codes_service import CodeAssigner, CodesConfig
from features.store import SyncOnlineStore
from headwater.servers import free_port
from learner.batch import decode_batch
from streams.audit_path import audit_engine_config
from streams.audit_shipper import ship_audit
from streams.item_path import make_encoder
from streams.topics import log_ends
from tests.faults.stackops import (
    movielens_items,
    restart_redis,
    send_items,
    snapshot_redis,
    stored_codes,
    worker_statuses,
)
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
    snapshot = snapshot_redis(stack)  # Redis as it was: dx-1 recorded, nothing after it

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
    restart_redis(stack, "redis3.log", restore_from=snapshot)
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


def _attack(data_dir, settings, host):
    """The dev03 attack log's lines and the alerts one uninterrupted engine gives."""
    lines = (data_dir / "audit" / "dev03_ingress_revshell.log").read_text(encoding="utf-8").splitlines(True)
    reference = DetectionEngine(host=host, config=audit_engine_config(settings))
    reference.process_lines(lines)
    return lines, {a["id"]: a for a in reference.alerts()}


def _ship_applied(stack, tmp_path, host, lines, what: str) -> None:
    """Append ``lines`` to the host's log file, ship what is new (100-line messages) and
    wait until every audit message on the broker is covered by stored detection state."""
    settings = Settings(topic_prefix=stack["prefix"], partitions=PARTITIONS)
    log = tmp_path / "audit.log"
    with log.open("a", encoding="utf-8") as f:
        f.write("".join(lines))
    ship_audit(settings, stack["kafka"], log, host, tmp_path / "pos", max_lines=100)
    client = redis.Redis.from_url(stack["url"])  # a new one: Redis may have restarted
    try:
        wait_until(lambda: _all_applied(client, stack["kafka"], settings.topics["audit"]), 90,
                   what=what, on_fail=stack["logs"])
    finally:
        client.close()


def _assert_alerts_as_one_run(expected, url, kafka, prefix, host) -> None:
    """Alerts in Redis and on the topic: exactly one uninterrupted run's (same ids,
    severities, versions, techniques), one growing alert per chain, none duplicated."""
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


def test_detection_state_survives_kill_9_mid_attack(stack, data_dir, tmp_path):
    """Killed with -9 in the middle of an attack log, a worker resumes the host's graph
    and alert chains: the alerts at the end are exactly those of one uninterrupted run."""
    settings = Settings(topic_prefix=stack["prefix"], partitions=PARTITIONS)
    host = f"vm-dur-{stack['prefix'][:-1]}"
    lines, expected = _attack(data_dir, settings, host)
    split = int(len(lines) * 0.6)
    before = DetectionEngine(host=host, config=audit_engine_config(settings))
    before.process_lines(lines[:split])
    chain = [i for i, a in expected.items() if a["severity"] == "high"]
    # the attack chain's alert exists, still low, before the kill
    assert len(chain) == 1 and {a["id"]: a for a in before.alerts()}[chain[0]]["severity"] == "low"

    worker = stack["start_worker"]()
    _ship_applied(stack, tmp_path, host, lines[:split], "the first part applied")
    worker.kill9()
    worker = stack["start_worker"]()
    _ship_applied(stack, tmp_path, host, lines[split:], "the rest applied")
    _assert_alerts_as_one_run(expected, stack["url"], stack["kafka"], stack["prefix"], host)
    assert "resumed its detection state" in worker.log()


def test_detection_state_survives_kill_9_between_snapshots(stack, data_dir, tmp_path):
    """A worker snapshots the host, the next one (snapshots every 1000 batches) keeps two
    parts of the log as journal entries only and is killed with -9: the third replays
    the journal on the snapshot, and the alerts at the end are exactly those of one
    uninterrupted run."""
    settings = Settings(topic_prefix=stack["prefix"], partitions=PARTITIONS)
    host = f"vm-jrn-{stack['prefix'][:-1]}"
    lines, expected = _attack(data_dir, settings, host)
    a, b, c = (int(len(lines) * f) for f in (0.3, 0.45, 0.6))
    worker = stack["start_worker"](HEADWATER_AUDIT_SNAPSHOT_EVERY=1)
    _ship_applied(stack, tmp_path, host, lines[:a], "the snapshotted part applied")
    worker.kill9()
    worker = stack["start_worker"](HEADWATER_AUDIT_SNAPSHOT_EVERY=1000)
    _ship_applied(stack, tmp_path, host, lines[a:b], "the first journalled part applied")
    _ship_applied(stack, tmp_path, host, lines[b:c], "the second journalled part applied")
    assert re.search(r"\b0 journal batches replayed", worker.log())  # the snapshot alone
    client = redis.Redis.from_url(stack["url"])
    fields = {k.decode() for p in range(PARTITIONS)
              for k in client.hkeys(state_key(settings.topics["audit"], p))}
    client.close()
    assert {f"h:{host}", f"a:{host}"} <= fields, fields
    assert sum(f.startswith(f"j:{host}:") for f in fields) >= 2, fields
    worker.kill9()
    worker = stack["start_worker"]()
    _ship_applied(stack, tmp_path, host, lines[c:], "the rest applied")
    _assert_alerts_as_one_run(expected, stack["url"], stack["kafka"], stack["prefix"], host)
    replayed = re.search(r"(\d+) journal batches replayed", worker.log())
    assert replayed and int(replayed[1]) >= 2, worker.log()


def test_detection_state_redis_lost_is_rebuilt_from_the_log(stack, data_dir, tmp_path):
    """Redis restored from an older copy loses detection state and alerts of a part of
    the log: the worker re-reads that part from Kafka, and the alerts end up exactly
    those of one uninterrupted run."""
    settings = Settings(topic_prefix=stack["prefix"], partitions=PARTITIONS)
    host = f"vm-gap-{stack['prefix'][:-1]}"
    lines, expected = _attack(data_dir, settings, host)
    a, b = int(len(lines) * 0.4), int(len(lines) * 0.7)
    worker = stack["start_worker"]()
    _ship_applied(stack, tmp_path, host, lines[:a], "the first part applied")
    snapshot = snapshot_redis(stack)
    _ship_applied(stack, tmp_path, host, lines[a:b], "the second part applied")
    restart_redis(stack, "redis3.log", restore_from=snapshot)  # the second part is lost
    client = redis.Redis.from_url(stack["url"])
    assert not _all_applied(client, stack["kafka"], settings.topics["audit"])
    client.close()
    _ship_applied(stack, tmp_path, host, lines[b:], "the lost part re-read")
    _assert_alerts_as_one_run(expected, stack["url"], stack["kafka"], stack["prefix"], host)
    assert "re-reading the gap" in worker.log()


def test_codebooks_are_shared_by_two_workers_and_kept_across_a_restart(stack, data_dir):
    kafka, prefix, url = stack["kafka"], stack["prefix"], stack["url"]
    settings = Settings(topic_prefix=prefix, partitions=PARTITIONS, content_encoder="hashing")
    topic = settings.topics["items"]
    client = redis.Redis.from_url(url)
    cfg = CodesConfig(levels=settings.code_levels, codebook_size=settings.codebook_size,
                      vq_k=settings.vq_k)
    books = CodebookStore(client, CodebookStore.config_name("hashing", cfg.levels, cfg.codebook_size,
                                                            cfg.vq_k), 1.0, str)
    items = movielens_items(data_dir)
    first, second, third = items[:400], items[400:440], items[440:460]
    assert len(first) > cfg.fit_threshold > len(third)

    workers = [stack["start_worker"](), stack["start_worker"](HEADWATER_WORKER_PORT=free_port())]

    def split_between_two():
        held = [set(s.get("assigned", {}).get(topic, [])) for s in worker_statuses(client)]
        return len(held) == 2 and all(held) and set.union(*held) == set(range(PARTITIONS))

    wait_until(split_between_two, 90, what="both workers holding item partitions",
               on_fail=stack["logs"])
    send_items(kafka, topic, first)
    ids = [it["item_id"] for it in first]
    wait_until(lambda: len(stored_codes(client, ids)) == len(ids), 90, what="codes of the first items",
               on_fail=stack["logs"])
    version = client.hget(books.current_key, "version").decode()
    assert {c[2] for c in stored_codes(client, ids).values()} == {version}
    # The fitter logs its first fit after writing the codes: wait for the line, then
    # there must be exactly one (the lease).
    wait_until(lambda: "first fit" in "".join(w.log() for w in workers), 30,
               what="the fitter's first-fit log line", on_fail=stack["logs"])
    logs = "".join(w.log() for w in workers)
    assert logs.count("first fit") == 1, logs[-3000:]  # one fitter (the lease)
    wait_until(lambda: [s.get("codebook_version") for s in worker_statuses(client)] == [version] * 2,
               30, what="both workers on the published version", on_fail=stack["logs"])

    # Whichever worker codes an item, its codes are the published version's.
    reference = CodeAssigner(make_encoder("hashing"), cfg)
    with np.load(io.BytesIO(client.get(books.version_key(version))), allow_pickle=False) as data:
        reference.import_codebooks({k: data[k] for k in data.files})

    def expected(batch):
        got = reference.quantize(*reference.encode_content(batch))
        return {str(i): ([int(v) for v in c["rq"]], [int(v) for v in c["vq"]], version)
                for i, c in got.items()}

    send_items(kafka, topic, second)
    ids = [it["item_id"] for it in second]
    wait_until(lambda: len(stored_codes(client, ids)) == len(ids), 60, what="codes of later items",
               on_fail=stack["logs"])
    assert stored_codes(client, ids) == expected(second)

    # A restart keeps every item's codes, and new items get codes at once (no new fit).
    before = stored_codes(client, [it["item_id"] for it in first + second])
    for w in workers:
        w.kill9()
    restarted = stack["start_worker"]()
    send_items(kafka, topic, third)
    ids = [it["item_id"] for it in third]
    wait_until(lambda: len(stored_codes(client, ids)) == len(ids), 90,
               what="codes of new items after the restart", on_fail=restarted.log)
    assert stored_codes(client, ids) == expected(third)
    assert stored_codes(client, list(before)) == before
    assert "first fit" not in restarted.log() and f"using version {version}" in restarted.log()
    client.close()


def test_detection_state_beyond_the_log_end_stops_the_partition(kafka_bootstrap, redis_db,
                                                                 topic_prefix, data_dir):
    """Redis holds detection state from a log that is gone (a reset broker): the audit
    partition stops (REWIND) instead of skipping the new log's events as replays, and
    ``headwater up``'s check names it."""
    import asyncio

    import redis.asyncio as aioredis

    from detection.state_store import DetectionStateStore
    from headwater.lifetimes import recorded_in_redis
    from streams.audit_path import AuditHandler
    from streams.metrics import WorkerMetrics
    from streams.topics import ensure_topics

    settings = Settings(topic_prefix=topic_prefix, partitions=PARTITIONS)
    ensure_topics(settings, kafka_bootstrap)
    topic = settings.topics["audit"]
    line = (data_dir / "audit" / "dev02_webshell_cmd_injection.log").read_text().splitlines()[0]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for _ in range(3):
        producer.send(topic, line.encode(), key=b"vm", partition=1)
    producer.flush()
    producer.close()

    async def go():
        client = aioredis.Redis.from_url(redis_db)
        try:
            store = DetectionStateStore(client)
            await store.save(topic, 1, None, 40, {}, b"[]")  # an older run got to offset 40
            handler = AuditHandler(settings.topics, WorkerMetrics(), state_store=store,
                                   log_end=lambda t, p: log_ends(kafka_bootstrap, t, [p])[p])
            out = await handler(topic, 1, [(0, b"vm", line.encode())])
            return out, handler.stopped
        finally:
            await client.aclose()

    out, stopped = asyncio.run(go())
    assert out == [] and "REWIND" in stopped[1] and "log ends at 3" in stopped[1]
    assert "headwater reset" in stopped[1]
    assert recorded_in_redis(redis_db, PARTITIONS)[(topic, 1)] == 40
