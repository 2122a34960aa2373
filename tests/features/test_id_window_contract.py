"""One contract suite for the duplicate event-id window: in Redis (real redis-server,
``features.event_ids.EventIdWindow``) and in memory (``features.memory_store.MemoryIdWindow``)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from features.event_ids import EventIdWindow
from features.memory_store import MemoryIdWindow
from features.store_protocol import DuplicateWindow


@pytest.fixture(params=["redis", "memory"])
def windows(request, redis_db):
    """``windows(capacity)`` -> a window; a second call with the same capacity shares its
    state (another worker, or a restarted one, on the same Redis)."""
    loop = asyncio.new_event_loop()
    clients, shared = [], {}

    def make(capacity: int):
        if request.param == "memory":
            return shared.setdefault(capacity, MemoryIdWindow(capacity))
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_db)
        clients.append(client)
        return EventIdWindow(client, capacity)

    make.run = loop.run_until_complete
    yield make
    for client in clients:
        loop.run_until_complete(client.aclose())
    loop.close()


def dups(windows, window, topic, partition, ids, offsets, subs=None):
    subs = np.zeros(len(ids), np.int64) if subs is None else np.asarray(subs)
    return windows.run(window.duplicates(topic, partition, ids, np.asarray(offsets), subs))


def test_tells_replays_from_duplicates(windows):
    recent = windows(3)
    assert isinstance(recent, DuplicateWindow)
    dup, first = dups(windows, recent, "clicks", 0, ["a", "b", "a"], [10, 10, 11], [0, 1, 0])
    assert dup.tolist() == [False, False, True] and first == [None, None, "10:0"]
    # The same message replayed (after a crash, by another worker, in a gap re-read) is
    # not a duplicate of itself.
    again = windows(3)
    dup, _ = dups(windows, again, "clicks", 0, ["a", "b"], [10, 10], [0, 1])
    assert dup.tolist() == [False, False]
    dup, first = dups(windows, again, "clicks", 0, ["b"], [40])
    assert dup.tolist() == [True] and first == ["10:1"]


def test_partitions_and_topics_are_independent(windows):
    recent = windows(3)
    dups(windows, recent, "clicks", 0, ["a"], [1])
    assert dups(windows, recent, "clicks", 1, ["a"], [5])[0].tolist() == [False]
    assert dups(windows, recent, "x-clicks", 0, ["a"], [5])[0].tolist() == [False]


def test_older_ids_leave_a_generation_at_a_time(windows):
    recent = windows(3)
    dups(windows, recent, "clicks", 0, ["a", "b", "c"], [10, 10, 10], [0, 1, 2])
    dups(windows, recent, "clicks", 0, ["d", "e"], [11, 12])
    # a, b, c form a full generation; it is still in the window beside the next one
    assert dups(windows, recent, "clicks", 0, ["a", "e"], [90, 91])[0].tolist() == [True, True]
    dups(windows, recent, "clicks", 0, ["f"], [13])  # d, e, f fill the next generation
    dups(windows, recent, "clicks", 0, ["g"], [14])  # ... and a, b, c leave, all at once
    dup, first = dups(windows, recent, "clicks", 0, ["a", "d", "c"], [92, 93, 94])
    assert dup.tolist() == [False, True, False] and first[1] == "11:0"
    with pytest.raises(ValueError):
        windows(0)


def test_the_newest_recorded_ids_are_always_refused_again(windows):
    # Against a brute force: an id recorded among the newest `capacity` records is refused
    # at any other position, and a refusal names the id's last recorded position.
    capacity = 50
    recent = windows(capacity)
    rng = np.random.default_rng(3)
    records: list[tuple[str, str]] = []  # (id, "offset:sub") in recording order
    offset = 0
    for _ in range(60):
        n = int(rng.integers(1, 40))
        ids = [f"e{int(x)}" for x in rng.integers(0, 150, n)]
        offset += 1
        subs = np.arange(n)
        dup, first = dups(windows, recent, "clicks", 0, ids, [offset] * n, subs)
        for i, eid in enumerate(ids):
            newest = {e: p for e, p in records[-capacity:]}
            last = next((p for e, p in reversed(records) if e == eid), None)
            if eid in newest:
                assert dup[i] and first[i] == newest[eid], (eid, offset, i)
            if dup[i]:
                assert first[i] == last
            else:
                records.append((eid, f"{offset}:{i}"))


def test_large_offsets_and_any_id_bytes_keep_their_exact_position(windows):
    recent = windows(10)
    ids = ["a:b", "é\u2603", "x" * 300, ""]
    off = 2**40 + 3
    dups(windows, recent, "clicks", 0, ids, [off] * 4, [0, 1, 2, 3])
    dup, first = dups(windows, recent, "clicks", 0, ids, [off + 1] * 4)
    assert dup.tolist() == [True] * 4
    assert first == [f"{off}:{s}" for s in range(4)]


def test_a_big_batch_is_checked_as_if_one_id_at_a_time(windows):
    # Thousands of ids in one call, with repeats inside the batch (near and far apart)
    # and an id a first batch already holds.
    recent = windows(20_000)
    dups(windows, recent, "clicks", 0, [f"old{i}" for i in range(3)], [1, 1, 1], [0, 1, 2])
    ids = [f"e{i}" for i in range(9000)]
    ids[4500], ids[8999], ids[10] = "e5", "old1", "e4000"  # e4000 comes again at 4000
    offs = np.arange(9000) // 100 + 10
    subs = np.arange(9000) % 100
    dup, first = dups(windows, recent, "clicks", 0, ids, offs, subs)
    assert np.flatnonzero(dup).tolist() == [4000, 4500, 8999]
    assert [first[i] for i in (4000, 4500, 8999)] == ["10:10", "10:5", "1:1"]
    # Replayed whole, nothing is a duplicate of itself; the later copies still are.
    dup, _ = dups(windows, recent, "clicks", 0, ids, offs, subs)
    assert np.flatnonzero(dup).tolist() == [4000, 4500, 8999]


def test_redis_agrees_with_one_id_at_a_time_across_chunks_and_rotations(redis_db):
    # The script looks ids up and records them per chunk of thousands, not per id: against
    # the in-memory window (one id at a time, in stream order) on batches that cross chunk
    # boundaries, repeat ids inside a batch and across batches, replay earlier batches at
    # their own positions and rotate generations mid-run — the same answers, and Redis
    # holds the same two generations afterwards.
    import redis
    import redis.asyncio as aioredis

    loop = asyncio.new_event_loop()
    client = aioredis.Redis.from_url(redis_db)
    capacity = 7_000
    in_redis, in_memory = EventIdWindow(client, capacity), MemoryIdWindow(capacity)
    rng = np.random.default_rng(11)
    sent: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    offset = 0
    try:
        for step in range(24):
            if sent and step % 5 == 4:
                ids, offs, subs = sent[int(rng.integers(0, len(sent)))]  # a replay
            else:
                n = int(rng.choice([1, 17, 2_999, 3_000, 3_001, 6_500]))
                ids = [f"u{int(x)}:i{int(x) % 97}" for x in rng.integers(0, 12_000, n)]
                offs = offset + np.arange(n) // 200
                subs = np.arange(n) % 200
                offset = int(offs[-1]) + 1
                sent.append((ids, offs, subs))
            for partition in (0, 1):
                got = loop.run_until_complete(in_redis.duplicates("clicks", partition, ids, offs, subs))
                want = loop.run_until_complete(in_memory.duplicates("clicks", partition, ids, offs, subs))
                assert got[0].tolist() == want[0].tolist(), step
                assert got[1] == want[1], step
        sync = redis.Redis.from_url(redis_db)
        for partition in (0, 1):
            current, previous = in_memory.windows["clicks", partition]
            cur_key, prev_key, _ = in_redis.keys("clicks", partition)
            assert {k.decode(): v.decode() for k, v in sync.hgetall(cur_key).items()} == current
            assert {k.decode(): v.decode() for k, v in sync.hgetall(prev_key).items()} == previous
        assert in_memory.windows["clicks", 0][1]  # the run did rotate
        sync.close()
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
