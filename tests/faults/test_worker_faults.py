"""Faults on the click path, with real processes: kill -9, a second worker, a Redis restart.

Every test replays the same real MovieLens events and asserts exact end states: the
all-time counters in Redis equal a direct count over the events, and every event's row
reached ``train-batches`` at least once.
"""

from __future__ import annotations

import collections
import json
import time

import pytest
from kafka import KafkaProducer

from features.movielens import click_events, load_movielens
from features.store import SyncOnlineStore
from headwater.servers import start_redis
from learner.batch import decode_batch
from streams.topics import partition_of
from tests.faults.stackops import restart_redis, snapshot_redis
from tests.stackutil import Service, read_topic, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

N_EVENTS = 6000
PARTITIONS = 4


@pytest.fixture(scope="module")
def events(data_dir):
    ml = load_movielens(data_dir / "ml-100k")
    return click_events(ml, 0, N_EVENTS)


def produce(kafka: str, topic: str, events: list[dict], per_message: int = 50,
            pause: float = 0.0) -> None:
    """Envelopes of ``per_message`` events, partitioned by user like the replay does."""
    producer = KafkaProducer(bootstrap_servers=kafka, linger_ms=5)
    parts = partition_of([e["user_id"] for e in events], PARTITIONS)
    buffers: dict[int, list] = collections.defaultdict(list)
    for ev, p in zip(events, parts, strict=True):
        buffers[int(p)].append(ev)
        if len(buffers[int(p)]) >= per_message:
            producer.send(topic, json.dumps(buffers.pop(int(p))).encode(), partition=int(p))
            if pause:
                time.sleep(pause)
    for p, buf in buffers.items():
        producer.send(topic, json.dumps(buf).encode(), partition=p)
    producer.flush()
    producer.close()


def expected_totals(events: list[dict]) -> dict[str, tuple[int, int]]:
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for ev in events:
        for entity in (f"item:{ev['item_id']}", f"user:{ev['user_id']}"):
            counts[entity][0] += 1
            counts[entity][1] += ev["label"]
    return {k: (v[0], v[1]) for k, v in counts.items()}


def actual_totals(redis_url: str, entities) -> dict[str, tuple[int, int]]:
    store = SyncOnlineStore.from_url(redis_url, partitions=PARTITIONS)
    try:
        out = {}
        for entity in entities:
            doc = store.entity_features(entity)
            out[entity] = (int(doc["impressions_total"]), int(doc["clicks_total"]))
        return out
    finally:
        store.close()


def rows_seen(kafka: str, topic: str) -> set[str]:
    seen: set[str] = set()
    for rec in read_topic(kafka, topic, timeout=3):
        seen.update(str(e) for e in decode_batch(rec.value).event_ids)
    return seen


def processed(redis_url: str, total: int) -> bool:
    store = SyncOnlineStore.from_url(redis_url, partitions=PARTITIONS)
    try:
        n = 0
        for p in range(PARTITIONS):
            n += sum(store.next_offsets(p).values())
        return n > 0 and total > 0
    finally:
        store.close()


def wait_all_counted(redis_url: str, expected: dict, timeout: float, svc_logs) -> dict:
    sample = [k for k in expected if k.startswith("item:")][:50]

    def done():
        got = actual_totals(redis_url, sample)
        return all(got[k] == expected[k] for k in sample)

    wait_until(done, timeout, interval=1.0, what="every event counted", on_fail=svc_logs)
    return actual_totals(redis_url, expected)


def _assert_exact(stack, events):
    expected = expected_totals(events)
    actual = wait_all_counted(stack["url"], expected, 120, stack["logs"])
    wrong = {k: (actual[k], v) for k, v in expected.items() if actual[k] != v}
    assert not wrong, f"{len(wrong)} entities differ (actual, expected): {list(wrong.items())[:5]}"
    seen = rows_seen(stack["kafka"], f"{stack['prefix']}train-batches")
    missing = {e["event_id"] for e in events} - seen
    assert not missing, f"{len(missing)} events never reached train-batches, e.g. {sorted(missing)[:5]}"


def test_worker_killed_mid_stream_leaves_exact_counters(stack, events):
    worker = stack["start_worker"]()
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[: N_EVENTS // 2])
    wait_until(lambda: processed(stack["url"], 1), 90, what="processing to start", on_fail=worker.log)
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[N_EVENTS // 2:], pause=0.002)
    worker.kill9()
    stack["start_worker"]()
    _assert_exact(stack, events)


def _assigned(worker, topic: str) -> set[int] | None:
    """The click partitions a worker reports holding on its own ``/healthz``."""
    import urllib.request

    url = f"http://127.0.0.1:{worker.env['HEADWATER_WORKER_PORT']}/healthz"
    try:
        doc = json.loads(urllib.request.urlopen(url, timeout=5).read())
    except OSError:
        return None
    return set(doc["assigned"].get(topic, []))


def test_workers_added_then_two_killed_leave_exact_counters(stack, events):
    """Three workers in turn, two of them killed with -9 mid-stream: the survivor takes
    every partition and the counters are exact."""
    first = stack["start_worker"]()
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[: N_EVENTS // 3])
    wait_until(lambda: processed(stack["url"], 1), 90, what="processing to start", on_fail=first.log)
    second, third = stack["start_worker"](), stack["start_worker"]()
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[N_EVENTS // 3: 2 * N_EVENTS // 3],
            pause=0.003)
    # Each worker answers on its own port, with its own share of the partitions.
    topic = f"{stack['prefix']}clicks"

    def shares():
        got = [_assigned(w, topic) for w in (first, second, third)]
        union = set().union(*got) if all(g is not None for g in got) else set()
        return got if union == set(range(PARTITIONS)) and sum(map(len, got)) == PARTITIONS else None

    wait_until(shares, 60, interval=0.5, what="three disjoint shares", on_fail=stack["logs"])
    first.kill9()
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[2 * N_EVENTS // 3: 5 * N_EVENTS // 6],
            pause=0.003)
    second.kill9()
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[5 * N_EVENTS // 6:])
    assert third.alive()
    _assert_exact(stack, events)
    assert _assigned(third, topic) == set(range(PARTITIONS))


def test_redis_restart_mid_stream_loses_and_doubles_nothing(stack, events):
    worker = stack["start_worker"]()
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[: N_EVENTS // 2])
    wait_until(lambda: processed(stack["url"], 1), 90, what="processing to start", on_fail=worker.log)
    old = stack["redis"]
    port, data = old.port, stack["tmp"] / "redis"
    old.proc.kill()
    old.proc.wait()
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[N_EVENTS // 2:])
    time.sleep(3)  # the worker sees the outage and retries
    stack["redis"] = start_redis(port=port, data_dir=data, log_path=stack["tmp"] / "redis2.log")
    assert worker.alive()
    _assert_exact(stack, events)
    assert "handler clicks failed" in worker.log()  # the outage was seen and retried


def test_redis_that_lost_its_last_writes_is_caught_up_by_replay(stack, events):
    """Redis restored from an older copy of its AOF: the worker re-reads the gap from Kafka."""
    worker = stack["start_worker"]()
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[: N_EVENTS // 3])
    third = expected_totals(events[: N_EVENTS // 3])
    wait_all_counted(stack["url"], third, 90, stack["logs"])
    snapshot = snapshot_redis(stack)
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[N_EVENTS // 3: 2 * N_EVENTS // 3])
    wait_all_counted(stack["url"], expected_totals(events[: 2 * N_EVENTS // 3]), 90, stack["logs"])
    # Now lose everything written since the snapshot, as a crash inside the fsync window would.
    restart_redis(stack, "redis3.log", restore_from=snapshot)
    produce(stack["kafka"], f"{stack['prefix']}clicks", events[2 * N_EVENTS // 3:])
    _assert_exact(stack, events)
    assert "re-reading the gap" in worker.log()


def _count_half_with_a_copy_at_a_quarter(stack, events):
    """A worker counts half the events; Redis's data is copied after the first quarter.

    Returns (the worker, the half, the copy): restoring the copy loses the second quarter.
    """
    worker = stack["start_worker"]()
    half = events[: N_EVENTS // 2]
    produce(stack["kafka"], f"{stack['prefix']}clicks", half[: N_EVENTS // 4])
    wait_all_counted(stack["url"], expected_totals(half[: N_EVENTS // 4]), 90, stack["logs"])
    snapshot = snapshot_redis(stack)
    produce(stack["kafka"], f"{stack['prefix']}clicks", half[N_EVENTS // 4:])
    wait_all_counted(stack["url"], expected_totals(half), 90, stack["logs"])
    return worker, half, snapshot


def test_lost_writes_are_repaired_without_waiting_for_new_events(stack, events):
    """No event arrives after Redis lost writes: every partition is verified at once."""
    worker, half, snapshot = _count_half_with_a_copy_at_a_quarter(stack, events)
    restart_redis(stack, "redis3.log", restore_from=snapshot)
    # Nothing more is produced: the worker notices the restart and repairs by itself.
    expected = expected_totals(half)
    actual = wait_all_counted(stack["url"], expected, 90, stack["logs"])
    assert actual == expected
    assert "verifying every assigned" in worker.log()
    assert "re-reading the gap" in worker.log()


def test_writes_lost_while_no_worker_ran_are_repaired_on_assignment(stack, events):
    """Redis loses writes while the worker is down: on assignment, before any new event."""
    worker, half, snapshot = _count_half_with_a_copy_at_a_quarter(stack, events)
    worker.stop()  # a clean stop commits the group's offsets: nothing will be re-delivered
    restart_redis(stack, "redis3.log", restore_from=snapshot)
    second = stack["start_worker"]()
    expected = expected_totals(half)
    actual = wait_all_counted(stack["url"], expected, 90, stack["logs"])
    assert actual == expected
    assert "re-reading the gap" in second.log()


def test_a_broker_log_reset_under_kept_redis_state_stops_the_partitions(stack, events, tmp_path):
    """The broker loses its log (memory storage, restarted) while Redis keeps its state.

    Redis records offsets the new log does not hold: the worker stops those partitions
    (REWIND) with an error naming the fix and a metric, and applies nothing of the new
    log's events, instead of treating them as replays of the old ones.
    """
    import urllib.request

    from core.settings import Settings
    from headwater.servers import start_broker
    from streams.topics import ensure_topics

    settings = Settings(topic_prefix=stack["prefix"], partitions=PARTITIONS)
    broker = start_broker(log_path=tmp_path / "own-broker.log")
    try:
        kafka = f"{broker.host}:{broker.port}"
        ensure_topics(settings, kafka)
        env = dict(stack["env"], HEADWATER_KAFKA=kafka)
        first = Service("worker", env, tmp_path / "logs")
        stack["services"].append(first)
        half = events[: N_EVENTS // 2]
        produce(kafka, f"{stack['prefix']}clicks", half)
        expected = expected_totals(half)
        wait_all_counted(stack["url"], expected, 90, stack["logs"])
        first.stop()
        broker.stop()  # memory storage: the log is gone, Redis keeps its offsets
        broker = start_broker(port=broker.port, log_path=tmp_path / "own-broker2.log")
        ensure_topics(settings, kafka)
        second = Service("worker", env, tmp_path / "logs")
        stack["services"].append(second)
        wait_until(lambda: second.log().count("REWIND") >= PARTITIONS, 90,
                   what="every partition stopped as a REWIND", on_fail=second.log)
        assert "headwater reset" in second.log()
        produce(kafka, f"{stack['prefix']}clicks", events[N_EVENTS // 2:])
        port = env["HEADWATER_WORKER_PORT"]

        def refused() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            rewinds = [ln for ln in text.splitlines()
                       if ln.startswith("headwater_partition_stopped{") and ln.endswith(" 1.0")]
            assert len(rewinds) == PARTITIONS, rewinds
            return len(rewinds)

        wait_until(refused, 30, what="the worker's metrics", on_fail=second.log)
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())
        assert len(health["stopped_partitions"]) == PARTITIONS
        time.sleep(3)  # the new events were consumed by now, were they applied they'd show
        assert actual_totals(stack["url"], expected) == expected
    finally:
        # the workers first: a Faust worker whose broker is gone waits on it while stopping
        for service in stack["services"]:
            service.stop()
        broker.stop()
