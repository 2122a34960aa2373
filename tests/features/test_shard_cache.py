"""The shard cache changes which keys a batch reads, never its results.

Every scenario runs twice on one real Redis: with the cache, and on another key prefix
with the cache off (every batch reads every key, as before the cache); features, flags
and the stored state must be the same.
"""

from __future__ import annotations

import numpy as np
import redis

from features.counters import CounterConfig, CounterSpec
from features.shard_cache import ShardCache
from features.store_core import latest_user_attrs

CFG = CounterConfig(
    specs=(
        CounterSpec("user", key=("user_id",)),
        CounterSpec("item", key=("item_id",)),
    ),
    half_lives=(60.0, 3600.0),
)


def _batch(rng, offset, n=40, t0=0.0):
    return {
        "ts": t0 + np.sort(rng.uniform(0, 100, n)),
        "user_id": rng.integers(0, 6, n).astype(str).tolist(),
        "item_id": rng.integers(0, 9, n).astype(str).tolist(),
        "label": rng.integers(0, 2, n).tolist(),
        "offset": (offset + np.arange(n) // 2).tolist(),
        "sub": (np.arange(n) % 2).tolist(),
    }


def _same(a, b):
    assert a.valid.tolist() == b.valid.tolist() and a.late.tolist() == b.late.tolist()
    assert a.replayed.tolist() == b.replayed.tolist() and a.next_offset == b.next_offset
    for k, v in b.features.items():
        np.testing.assert_array_equal(a.features[k], v, err_msg=k)


def _strip(d, p):
    return {k.replace(p, "", 1): v for k, v in d.items()}


def test_other_writers_and_lost_writes_never_serve_stale_states(make_store, dump_state, redis_db):
    """Two workers share the shards; Redis then loses writes (restored keys): the cached
    store gives exactly what a store reading every key gives."""
    cached, other = make_store(partitions=2, counters=CFG), make_store(partitions=2, counters=CFG)
    plain = make_store(partitions=2, counters=CFG, prefix="plain", shard_cache_entities=0)
    plain_other = make_store(partitions=2, counters=CFG, prefix="plain", shard_cache_entities=0)
    client = redis.Redis.from_url(redis_db)
    rng = np.random.default_rng(5)
    steps = [("cached", 0, _batch(rng, 0, t0=0)), ("cached", 1, _batch(rng, 0, t0=50)),
             ("other", 1, _batch(rng, 20, t0=120)),  # another writer moves shard 1
             ("cached", 0, _batch(rng, 20, t0=200)), ("cached", 1, _batch(rng, 40, t0=260))]
    for who, p, ev in steps:
        a = (cached if who == "cached" else other).apply_batch("clicks", p, ev)
        b = (plain if who == "cached" else plain_other).apply_batch("clicks", p, ev)
        _same(a, b)
    assert len(cached.shard_cache.snapshot(1, ["item:1"]).rows) == 1  # it does cache
    # Redis loses the next write of shard 0: copy the shard, write, put the copy back.
    lost = _batch(rng, 40, t0=330)
    for prefix, store in (("hw", cached), ("plain", plain)):
        saved = {k: client.dump(k) for k in client.scan_iter(f"{{{prefix}:p0}}*")}
        store.apply_batch("clicks", 0, lost)
        for k in client.scan_iter(f"{{{prefix}:p0}}*"):
            client.delete(k)
        for k, v in saved.items():
            client.restore(k, 0, v)
    again = cached.apply_batch("clicks", 0, lost)
    assert not again.replayed.any()
    _same(again, plain.apply_batch("clicks", 0, lost))
    later = _batch(rng, 60, t0=400)
    _same(cached.apply_batch("clicks", 0, later), plain.apply_batch("clicks", 0, later))
    assert _strip(dump_state("{hw:*"), "{hw:") == _strip(dump_state("{plain:*"), "{plain:")
    client.close()


def test_cache_is_bounded_and_versions_tag_every_row():
    sc = ShardCache(width=3, max_entities=4)
    v1, v2 = (b"a", b"1"), (b"b", b"2")
    sc.put(0, v1, ["x", "y"], np.array([[1.0, 2, 3], [4, 5, 6]]))
    snap = sc.snapshot(0, ["y", "z", "x"])
    assert snap.version == v1 and snap.pos.tolist()[1] == -1 and snap.missing.tolist() == [1]
    got = sc.assemble(0, ["y", "z", "x"], snap, v1, np.array([[7.0, 8, 9]]))
    assert got.tolist() == [[4, 5, 6], [7, 8, 9], [1, 2, 3]]
    # Another version: the cached part is not used.
    snap = sc.snapshot(0, ["x", "w"])
    assert sc.assemble(0, ["x", "w"], snap, v2, np.array([[0.0, 0, 0]])) is None
    sc.put(0, v1, ["p", "q", "r"], np.zeros((3, 3)))  # over the bound: refilled
    assert sc.snapshot(0, ["x"]).pos.tolist() == [-1]
    assert sc.snapshot(0, ["p", "q", "r"]).missing.tolist() == []
    off = ShardCache(width=3, max_entities=0)
    off.put(0, v1, ["x"], np.zeros((1, 3)))
    assert off.snapshot(0, ["x"]).missing.tolist() == [0]


def test_latest_user_attributes_match_the_per_event_rule():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(0, 30))
        uids = np.asarray(rng.choice(["", "1", "2", "3"], n), dtype=object)
        ts = rng.choice([1.0, 2.0, 3.0], n)  # many ties: the later event wins
        users = [None if rng.random() < 0.2 else {"k": int(rng.integers(0, 100))} for _ in range(n)]
        want: dict = {}
        for uid, t, attrs in zip(uids, ts, users, strict=True):
            if uid and attrs and (uid not in want or t >= want[uid][0]):
                want[uid] = (float(t), attrs)
        got = latest_user_attrs({"user_id": uids, "ts": ts, "user": users})
        assert list(got) == list(want) and all(got[u][1] is want[u][1] for u in want)
        assert all(got[u][0] == want[u][0] for u in want)
