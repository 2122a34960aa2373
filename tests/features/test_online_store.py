"""The Redis online store against a real redis-server (the session's, flushed per test)."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from features.counters import (
    CounterConfig,
    CounterSpec,
    aggregate,
    as_columns,
    derive_features,
    resolve_refs,
)
from features.store import OnlineStore
from features.store_core import READ, SCRIPT_KEYS
from tests.features.counter_cfg import CFG


def _events(ml, start, stop, per_message=1):
    """MovieLens clicks start:stop as columns; ``per_message`` events share one offset."""
    c = ml.clicks
    idx = np.arange(start, stop)
    return {
        "event_id": c["event_id"][idx],
        "ts": c["ts"][idx],
        "user_id": c["user_id"][idx],
        "item_id": c["item_id"][idx],
        "label": c["label"][idx],
        "offset": idx // per_message,
        "sub": idx % per_message,
        "user": [ml.users[u] for u in c["user_id"][idx]],
    }


def _slice(cols, sl):
    out = {}
    for k, v in cols.items():
        out[k] = v[sl] if isinstance(v, np.ndarray) else [v[i] for i in np.arange(len(v))[sl]]
    return out


def _reference_features(cfg, cols, item_attrs, ref):
    refs = resolve_refs(cfg, as_columns(cols), item_attrs)
    pre = np.zeros((len(refs.event), cfg.width))
    for e in range(refs.n_events):
        rows = np.flatnonzero(refs.event == e)
        names = [refs.entities[k] for k in refs.entity[rows]]
        pre[rows] = ref.apply(names, float(cols["ts"][e]), int(cols["label"][e]))
    return derive_features(cfg, aggregate(refs, pre)), ref


def _assert_features_equal(got, want, mask=None):
    for k, v in want.items():
        g = got[k] if mask is None else got[k][mask]
        np.testing.assert_allclose(
            g, v if mask is None else v[mask], rtol=1e-9, atol=1e-9, err_msg=k
        )


@pytest.fixture
def ml_items(ml):
    return {i: {k: v for k, v in a.items() if k != "title"} for i, a in ml.items.items()}


@pytest.mark.parametrize("ties", [False, True])
def test_point_in_time_features_match_event_by_event_reference(
    make_store, ml, ml_items, strict_reference, ties
):
    store = make_store(partitions=1, counters=CFG, pit_ties=ties)
    store.put_item_attributes(ml_items, ts=0)
    cols = _events(ml, 0, 600, per_message=3)
    ref = strict_reference(CFG.half_lives, ties=ties)
    for start in range(0, 600, 150):
        batch = _slice(cols, slice(start, start + 150))
        res = store.apply_batch("clicks", 0, batch)
        want, ref = _reference_features(CFG, batch, ml_items, ref)
        assert res.valid.all() and res.late_count == 0 and res.duplicate_count == 0
        _assert_features_equal(res.features, want)
    assert res.next_offset == 200
    assert store.next_offsets(0) == {"clicks": 200}


def test_shuffled_input_order_is_applied_in_offset_order(make_store, ml, ml_items):
    a, b = make_store(counters=CFG), make_store(counters=CFG, prefix="other")
    for s in (a, b):
        s.put_item_attributes(ml_items, ts=0)
    cols = _events(ml, 0, 200, per_message=4)
    perm = np.random.default_rng(0).permutation(200)
    ra = a.apply_batch("clicks", 0, cols)
    rb = b.apply_batch("clicks", 0, _slice(cols, perm))
    _assert_features_equal({k: v[np.argsort(perm)] for k, v in rb.features.items()}, ra.features)


def test_reapplying_a_batch_changes_nothing_and_returns_the_same_features(
    make_store, dump_state, ml, ml_items
):
    store = make_store(counters=CFG)
    store.put_item_attributes(ml_items, ts=0)
    batch = _events(ml, 0, 300, per_message=2)
    first = store.apply_batch("clicks", 0, batch)
    state = dump_state()
    again = store.apply_batch("clicks", 0, batch)
    assert dump_state() == state
    assert again.duplicate_count == 300 and again.valid.all() and again.replayed.all()
    _assert_features_equal(again.features, first.features)


def test_partial_overlap_and_crash_replay_leave_the_clean_run_state(
    make_store, dump_state, ml, ml_items
):
    cols = _events(ml, 0, 400, per_message=2)
    clean = make_store(counters=CFG, prefix="clean")
    clean.put_item_attributes(ml_items, ts=0)
    clean_res = clean.apply_batch("clicks", 0, cols)

    store = make_store(counters=CFG)
    store.put_item_attributes(ml_items, ts=0)
    parts = [slice(0, 100), slice(50, 250), slice(250, 400)]  # second overlaps the first
    for sl in parts:
        store.apply_batch("clicks", 0, _slice(cols, sl))
    # "Crash": the worker restarts from an earlier committed offset and replays.
    replay = store.apply_batch("clicks", 0, _slice(cols, slice(100, 400)))
    assert replay.duplicate_count == 300 and replay.valid.all()
    _assert_features_equal(replay.features, {k: v[100:] for k, v in clean_res.features.items()})
    strip = lambda d, p: {k.replace(p, "", 1): v for k, v in d.items()}  # noqa: E731
    _assert_same_state(strip(dump_state("{hw:*"), "{hw:"), strip(dump_state("{clean:*"), "{clean:"))


def _assert_same_state(got, want):
    """Same keys, offsets, totals and times exactly; decayed sums to float rounding;
    point-in-time histories byte for byte.

    Batches are computed with prefix sums, so the same events split into different
    batches round the decayed sums differently in the last bits (1e-16 relative); the
    counts, the offsets and ``t`` are exact.
    """
    assert got.keys() == want.keys()
    for key, fields in want.items():
        if isinstance(fields, bytes):
            # A history (features/asof.py): appended in offset order, folded by count only.
            assert got[key] == fields, key
            continue
        assert got[key].keys() == fields.keys(), key
        for f, v in fields.items():
            if b"@" in f:
                assert float(got[key][f]) == pytest.approx(float(v), rel=1e-12, abs=1e-300), key
            else:
                assert got[key][f] == v, (key, f)


def test_events_older_than_the_replay_cache_are_marked_invalid(make_store, ml, ml_items):
    store = make_store(counters=CFG, replay_batches=1)
    store.put_item_attributes(ml_items, ts=0)
    cols = _events(ml, 0, 200)
    store.apply_batch("clicks", 0, _slice(cols, slice(0, 100)))
    store.apply_batch("clicks", 0, _slice(cols, slice(100, 200)))
    res = store.apply_batch("clicks", 0, cols)
    assert res.duplicate_count == 200
    assert not res.valid[:100].any() and res.valid[100:].all()


def test_late_events_are_counted_exact_and_never_move_time_back(make_store, redis_db):
    cfg = CounterConfig(specs=(CounterSpec("item", key=("item_id",)),), half_lives=(100.0,))
    registry = CollectorRegistry()
    store = make_store(counters=cfg, registry=registry)
    in_order = make_store(counters=cfg, prefix="ordered")
    ts, labels = [1000.0, 1200.0, 900.0, 1300.0], [1, 0, 1, 1]
    ev = {"ts": ts, "item_id": [5] * 4, "label": labels, "offset": [0, 1, 2, 3], "sub": [0] * 4}
    res = store.apply_batch("clicks", 0, ev)
    assert res.late.tolist() == [False, False, True, False] and res.late_count == 1
    # Strict point in time: the late event (t=900) sees nothing from t=1000 or t=1200,
    # and t=1300 sees all three earlier ones, each decayed from its own time.
    assert res.features["item_impressions_total"].tolist() == [0, 1, 0, 3]
    assert res.features["item_impressions_100s"][3] == pytest.approx(
        2**-3 + 2**-1 + 2**-4
    )
    order = np.argsort(ts)
    in_order.apply_batch(
        "clicks",
        0,
        {k: np.asarray(v)[order] for k, v in ev.items() if k != "offset"}
        | {"offset": [0, 1, 2, 3]},
    )
    now = 1300.0
    late_view, ordered_view = (
        store.entity_features("item:5", now),
        in_order.entity_features("item:5", now),
    )
    for k in ("impressions_total", "clicks_total", "impressions_100s", "clicks_100s", "ctr_100s"):
        assert late_view[k] == pytest.approx(ordered_view[k], rel=1e-12), k
    client = redis.Redis.from_url(redis_db)
    assert float(client.hget("{hw:p0}:item:5", "t")) == 1300.0
    assert (
        registry.get_sample_value("headwater_features_late_events_total", {"topic": "clicks"}) == 1
    )
    store.apply_batch("clicks", 0, ev)
    assert (
        registry.get_sample_value("headwater_features_duplicate_events_total", {"topic": "clicks"})
        == 4
    )
    client.close()


def test_reads_sum_partition_shards_and_batches_see_other_shards(make_store):
    cfg = CounterConfig(specs=(CounterSpec("item", key=("item_id",)),), half_lives=(3600.0,))
    store = make_store(partitions=3, counters=cfg)
    store.apply_batch(
        "clicks", 0, {"ts": [10.0, 20.0], "item_id": [7, 7], "label": [1, 1], "offset": [0, 1]}
    )
    res = store.apply_batch(
        "clicks", 2, {"ts": [30.0], "item_id": [7], "label": [0], "offset": [0]}
    )
    assert res.features["item_impressions_total"].tolist() == [2.0]
    assert res.features["item_impressions_1h"][0] == pytest.approx(
        2 ** (-20 / 3600) + 2 ** (-10 / 3600)
    )
    got = store.get_online_features(
        {"item_id": [7, 8]}, ["item_impressions_total", "item_clicks_total"], now=30.0
    )
    assert got["item_impressions_total"].tolist() == [3.0, 0.0]
    assert got["item_clicks_total"].tolist() == [2.0, 0.0]
    ent = store.entity_features("item:7", now=30.0)
    assert ent["impressions_by_partition"] == {0: 2, 2: 1}
    assert store.next_offsets(0) == {"clicks": 2} and store.next_offsets(1) == {}


def test_get_online_features_is_one_round_trip_and_decays_to_now(make_store, redis_db):
    store = make_store(partitions=4, counters=CFG)
    store.put_item_attributes({i: {"genres": ["Drama"]} for i in range(100)}, ts=0)
    store.apply_batch(
        "clicks",
        1,
        {"ts": [0.0, 0.0], "user_id": [1, 1], "item_id": [3, 4], "label": [1, 0], "offset": [0, 1]},
    )
    rows = [{"user_id": 1, "item_id": i} for i in range(100)]
    store.get_online_features(rows, now=0.0)  # warms the item-attribute cache
    client = redis.Redis.from_url(redis_db)
    client.config_resetstat()
    before = store.round_trips
    got = store.get_online_features(rows, now=3600.0)
    assert store.round_trips - before == 1
    stats = client.info("commandstats")
    # the read script for every partition shard, in calls of at most SCRIPT_KEYS keys:
    # 4 shards x 103 entities (100 items, the user, the genre, the user x genre) = 412 keys
    assert stats["cmdstat_evalsha"]["calls"] == -(-4 * 103 // SCRIPT_KEYS)
    assert got["user_impressions_total"][0] == 2.0
    assert got["user_impressions_1h"][0] == pytest.approx(1.0)  # 2 impressions, one half-life
    assert got["user_clicks_1d"][0] == pytest.approx(2 ** (-1 / 24))
    assert got["genre_impressions_total"].tolist() == [2.0] * 100
    assert got["item_impressions_total"][3:5].tolist() == [1.0, 1.0]
    assert got["item_attrs"][3] == {"genres": ["Drama"]} and got["codes"][3] is None
    client.close()


def _general_path(cfg, attrs, batch, rows, features=None, partitions=3):
    """The same read through the in-memory store: the general, vectorised resolver by
    name (``resolve_refs``), with the same batch and item attributes written."""
    import asyncio

    from features.memory_store import MemoryOnlineStore

    async def read():
        mem = MemoryOnlineStore(partitions=partitions, counters=cfg)
        await mem.put_item_attributes(attrs, ts=0)
        await mem.apply_batch("clicks", 0, batch)
        return await mem.get_online_features(rows, features, now=100.0)

    return asyncio.run(read())


GENRES = {i: {"genres": [["Drama", "Comedy"], ["Drama"], []][i % 3]} for i in range(20)}


def test_one_request_read_by_slot_equals_the_general_path(make_store):
    """A request's read (its entities numbered by slot, each read once; the store has
    no other path) gives the general resolver's features, also when the read names some
    of the features (their own templates)."""
    store = make_store(partitions=3, counters=CFG)
    batch = {"ts": [0.0, 5.0, 7.0], "user_id": [1, 2, 1], "item_id": [3, 4, 5],
             "label": [1, 0, 1], "offset": [0, 1, 2]}
    store.put_item_attributes(GENRES, ts=0)
    store.apply_batch("clicks", 0, batch)
    rows = [{"user_id": 1, "item_id": i} for i in [*range(20), 3, 4]]  # repeats too
    want = _general_path(CFG, GENRES, batch, rows)
    got = store.get_online_features(rows, now=100.0)
    for name in CFG.feature_names():
        assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-12), name
    assert got["user_genre_impressions_total"].any()
    names = [n for n in CFG.feature_names() if n.startswith(("user_genre", "genre"))]
    got = store.get_online_features(rows, names, now=100.0)
    assert sorted(got) == sorted(names)
    for name in names:
        assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-12), name


def test_requests_read_together_equal_their_reads_alone_and_the_general_path(make_store):
    """Several requests' rows read together (serving's coalesced reads: each request a
    run of one user and one context) give each request, to the bit, what its read alone
    gives, and the general resolver's features. A run ends where the user or the context
    changes; an equal context in another object continues it."""
    from features.counters import CounterConfig, CounterSpec

    cfg = CounterConfig(specs=(*CFG.specs, CounterSpec("device_genre", key=("context.device", "genre"))),
                        half_lives=CFG.half_lives)
    store = make_store(partitions=3, counters=cfg)
    batch = {"ts": [0.0, 5.0, 7.0, 8.0], "user_id": [1, 2, 1, 3], "item_id": [3, 4, 4, 0],
             "label": [1, 0, 1, 1], "offset": [0, 1, 2, 3],
             "context": [{"device": "tv"}, {"device": "tv"}, {"device": "phone"}, None]}
    store.put_item_attributes(GENRES, ts=0)
    store.apply_batch("clicks", 0, batch)
    tv = {"device": "tv"}
    requests = [(1, tv), (1, {"device": "phone"}), (2, tv), (2, dict(tv)), (3, None), (1, tv)]
    alone, users, items, contexts = [], [], [], []
    for k, (user, ctx) in enumerate(requests):
        cands = [str(i) for i in [*range(k, 20), 3, 4]]
        alone.append(store.get_online_features(
            {"user_id": np.array([str(user)] * len(cands), dtype=object),
             "item_id": np.array(cands, dtype=object), "context": [ctx] * len(cands)}, now=100.0))
        users += [str(user)] * len(cands)
        items += cands
        contexts += [ctx] * len(cands)
    together = {"user_id": np.array(users, dtype=object), "item_id": np.array(items, dtype=object),
                "context": contexts}
    got = store.get_online_features(together, now=100.0)
    want = _general_path(cfg, GENRES, batch, together)
    for name in cfg.feature_names():
        assert got[name].tolist() == [v for a in alone for v in a[name].tolist()], name
        assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-12), name
    assert got["device_genre_impressions_total"].any()  # the context's counters were read


def test_attributes_codes_and_entity_view(make_store):
    store = make_store(counters=CFG)
    assert store.put_item_attributes({242: {"genres": ["Comedy"], "year": 1996, "ts": 50}}) == 1
    assert store.put_item_attributes({242: {"genres": ["Old"], "ts": 10}}) == 0  # older: ignored
    store.set_item_codes(242, {"rq": [3, 1, 4], "vq": [9]}, version="cb-1")
    assert store.get_item_codes_many([242, 999]) == [{"rq": [3, 1, 4], "vq": [9]}, None]
    store.apply_batch(
        "clicks",
        0,
        {
            "ts": [100.0],
            "user_id": [42],
            "item_id": [242],
            "label": [1],
            "offset": [0],
            "user": [{"age": 30, "gender": "F"}],
        },
    )
    item = store.entity_features("item:242", now=100.0)
    assert item["impressions_total"] == 1 and item["clicks_total"] == 1
    assert item["attributes"] == {"genres": ["Comedy"], "year": 1996}
    assert item["codes"] == {"rq": [3, 1, 4], "vq": [9]} and item["codes_version"] == "cb-1"
    assert item["ctr_total"] == pytest.approx((1 + 5 * 0.5) / 6)
    user = store.entity_features("user:42", now=100.0)
    assert user["attributes"] == {"age": 30, "gender": "F"}
    assert store.entity_features("user_genre:42|Comedy")["impressions_total"] == 1
    with pytest.raises(ValueError, match="expected"):
        store.entity_features("nobody:1")


def test_scripts_are_reloaded_after_a_flush(make_store, redis_db):
    store = make_store(counters=CFG)
    client = redis.Redis.from_url(redis_db)
    client.script_flush()
    res = store.apply_batch(
        "clicks", 0, {"ts": [1.0], "user_id": [1], "item_id": [2], "label": [1], "offset": [0]}
    )
    assert res.next_offset == 1
    client.close()


async def test_async_store_runs_the_same_plans(redis_db):
    store = OnlineStore.from_url(redis_db, partitions=2, counters=CFG)
    try:
        ev = {
            "ts": [1.0, 2.0],
            "user_id": [1, 1],
            "item_id": [2, 2],
            "label": [1, 0],
            "offset": [5, 6],
        }
        res = await store.apply_batch("clicks", 1, ev)
        assert res.features["user_impressions_total"].tolist() == [0.0, 1.0]
        assert await store.next_offsets(1) == {"clicks": 7}
        got = await store.get_online_features([{"user_id": 1}], ["user_clicks_total"], now=2.0)
        assert got["user_clicks_total"].tolist() == [1.0] and set(got) == {"user_clicks_total"}
        assert (await store.entity_features("user:1"))["impressions_total"] == 2
    finally:
        await store.aclose()


def test_fence_refuses_a_stale_writer_which_re_reads_and_applies_only_the_rest(
    make_store, dump_state, redis_db
):
    """A zombie worker computed its batch, then the new owner wrote first: the zombie's
    write is refused, it re-reads, takes the owner's events from the replay cache and
    applies only the rest; the end state is that of one clean run."""
    from features.store_core import APPLY as _APPLY

    cfg = CounterConfig(specs=(CounterSpec("item", key=("item_id",)),), half_lives=(100.0,))
    registry = CollectorRegistry()
    zombie = make_store(counters=cfg, registry=registry)
    owner = make_store(counters=cfg)
    clean = make_store(counters=cfg, prefix="clean")
    ev = {"ts": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0], "item_id": [1, 2, 1, 1, 2, 1],
          "label": [1, 0, 1, 0, 0, 1], "offset": [0, 1, 2, 3, 4, 5]}
    first4 = {k: v[:4] for k, v in ev.items()}
    want = clean.apply_batch("clicks", 0, ev)

    plan = zombie._plan_apply("clicks", 0, ev)
    cmds, raced, writes = next(plan), False, 0
    try:
        while True:
            if any(c[0] == "EVALSHA" and c[1] == _APPLY[1] for c in cmds):
                writes += 1
                if not raced:  # the owner writes between the zombie's read and write
                    owner_res = owner.apply_batch("clicks", 0, first4)
                    raced = True
            cmds = plan.send(zombie._execute(cmds))
    except StopIteration as stop:
        got = stop.value
    assert writes == 2 and owner_res.next_offset == 4
    assert got.duplicate_count == 4 and got.replayed.tolist() == [True] * 4 + [False] * 2
    assert got.valid.all() and got.next_offset == 6
    _assert_features_equal(got.features, want.features)
    assert registry.get_sample_value(
        "headwater_features_fenced_writes_total", {"topic": "clicks"}
    ) == 1
    strip = lambda d, p: {k.replace(p, "", 1): v for k, v in d.items()}  # noqa: E731
    _assert_same_state(strip(dump_state("{hw:*"), "{hw:"), strip(dump_state("{clean:*"), "{clean:"))


def test_a_writer_that_keeps_losing_the_race_gives_up_loudly(make_store):
    store = make_store(counters=CFG)
    other = make_store(counters=CFG)
    ev = {"ts": [1.0], "user_id": [1], "item_id": [2], "label": [1], "offset": [100]}
    plan = store._plan_apply("clicks", 0, ev)
    cmds, offset = next(plan), -1
    with pytest.raises(RuntimeError, match="another worker"):
        while True:
            if any(c[0] == "EVALSHA" and c[1] == _apply_sha() for c in cmds):
                offset += 1  # someone else moves the partition ahead (below 100) every time
                other.apply_batch("clicks", 0, {**ev, "offset": [offset]})
            cmds = plan.send(store._execute(cmds))


def _apply_sha():
    from features.store_core import APPLY as _APPLY

    return _APPLY[1]


def test_replaying_offsets_that_now_hold_other_events_is_a_rewind(make_store, dump_state, ml,
                                                                    ml_items):
    """The replay cache is verified by event id: a log reset never gets another run's features."""
    from features.store_apply import RewindError

    store = make_store(counters=CFG)
    store.put_item_attributes(ml_items, ts=0)
    first = _events(ml, 0, 200, per_message=2)
    store.apply_batch("clicks", 0, first)
    state = dump_state("{hw:p0}*")  # counters and offsets (user attributes are guarded apart)
    other = _events(ml, 200, 400, per_message=2)
    other["offset"] = first["offset"]  # a new log: the same offsets, other events
    with pytest.raises(RewindError, match=r"clicks\[0\]: REWIND: offset 0 .*headwater reset"):
        store.apply_batch("clicks", 0, other)
    assert dump_state("{hw:p0}*") == state  # nothing was written
    again = store.apply_batch("clicks", 0, first)  # the same events replayed are fine
    assert again.replayed.all() and again.valid.all()


def test_a_recorded_offset_behind_the_expected_one_is_a_gap(make_store, dump_state, ml):
    from features.store_apply import GapError

    store = make_store(counters=CFG)
    cols = _events(ml, 0, 100)
    store.apply_batch("clicks", 0, _slice(cols, slice(0, 50)))
    state = dump_state("{hw:p0}*")
    with pytest.raises(GapError) as info:
        store.apply_batch("clicks", 0, _slice(cols, slice(60, 100)), expect_next=60)
    assert (info.value.recorded, info.value.expected) == (50, 60)
    assert dump_state("{hw:p0}*") == state
    store.apply_batch("clicks", 0, _slice(cols, slice(50, 100)), expect_next=50)


def test_read_cache_serves_shared_entities_and_always_reads_the_users(make_store):
    """Serving's read cache: features equal a fresh read, decayed to each request's time;
    a user's own counters are read every time, shared entities within the cache's TTL."""
    fresh = make_store(partitions=3, counters=CFG)
    cached = make_store(partitions=3, counters=CFG, read_cache_seconds=10.0)
    fresh.put_item_attributes({i: {"genres": ["Drama", "Comedy"]} for i in range(20)}, ts=0)
    fresh.apply_batch("clicks", 0, {"ts": [0.0, 5.0], "user_id": [1, 2], "item_id": [3, 4],
                                    "label": [1, 0], "offset": [0, 1]})
    fresh.apply_batch("clicks", 2, {"ts": [6.0], "user_id": [1], "item_id": [4],
                                    "label": [1], "offset": [0]})
    rows = [{"user_id": 1, "item_id": i} for i in range(20)]
    for now in (100.0, 104.0):  # a miss, then hits decayed to a later time
        want, got = fresh.get_online_features(rows, now=now), cached.get_online_features(rows, now=now)
        for name in CFG.feature_names():
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, err_msg=name)
    assert cached.read_cache.hits > 0
    # a new click: the user's counters show it at once; the item's only after the TTL
    fresh.apply_batch("clicks", 1, {"ts": [105.0], "user_id": [1], "item_id": [3],
                                    "label": [1], "offset": [0]})
    got = cached.get_online_features(rows, now=106.0)
    want = fresh.get_online_features(rows, now=106.0)
    assert got["user_impressions_total"][0] == want["user_impressions_total"][0] == 3.0
    assert got["item_impressions_total"][3] == 1.0 and want["item_impressions_total"][3] == 2.0
    got = cached.get_online_features(rows, now=111.0)  # TTL over: read again
    assert got["item_impressions_total"][3] == 2.0


def test_item_answers_expire_together_and_are_reread_in_one_call_never_later(make_store):
    """Cached item attributes (and absences) are re-read at most ``attr_cache_seconds``
    (``miss_cache_seconds``) after they were read, as before; the first request that
    must ask Redis re-reads every entry due within a quarter of that, so the requests
    after it need no second round trip (real Redis)."""
    clock = [1000.0]
    store = make_store(partitions=2, counters=CFG, attr_cache_seconds=8.0, miss_cache_seconds=2.0,
                       clock=lambda: clock[0])
    writer = make_store(partitions=2, counters=CFG)
    writer.put_item_attributes({i: {"genres": ["Drama"]} for i in range(50)}, ts=0)
    known = [{"user_id": 1, "item_id": i} for i in range(50)]
    unknown = [{"user_id": 1, "item_id": f"new{i}"} for i in range(10)]
    store.get_online_features(known[:25] + unknown[:5], now=clock[0])
    clock[0] += 0.5
    store.get_online_features(known[25:] + unknown[5:], now=clock[0])

    def trips(rows) -> int:
        before = store.round_trips
        store.get_online_features(rows, now=clock[0])
        return store.round_trips - before

    clock[0] += 1.0  # still within every entry's lifetime: no item reads
    assert trips(known + unknown) == 1
    # an absence is re-read within miss_cache_seconds: the item has arrived meanwhile
    writer.put_item_attributes({"new7": {"genres": ["Comedy"]}}, ts=0)
    clock[0] += 1.0
    assert trips(unknown[:1]) == 2  # the due absences (all ten) in one extra call
    assert trips(unknown) == 1  # ... so no other request pays for them
    got = store.get_online_features([{"user_id": 1, "item_id": "new7"}], now=clock[0])
    assert got["item_attrs"][0]["genres"] == ["Comedy"]
    # an attribute change is seen at most attr_cache_seconds after the cached read
    writer.put_item_attributes({7: {"genres": ["Horror"]}}, ts=1)
    clock[0] = 1000.0 + 8.0 + 0.01
    assert trips(known[:1]) == 2  # every entry read in the first quarter-step, at once
    assert trips(known) == 1
    got = store.get_online_features([{"user_id": 1, "item_id": 7}], now=clock[0])
    assert got["item_attrs"][0]["genres"] == ["Horror"]
    # an item nobody asked for within 2 x attr_cache_seconds is left to expire, not re-read
    clock[0] += 8.0 + 0.01
    assert trips(known) == 2  # every known item read again
    clock[0] += 8.0 + 0.01
    assert trips(known[:2]) == 2  # the others re-read with them: wanted 8 s ago
    assert trips(known[2:4]) == 1
    clock[0] += 8.0 + 0.01
    assert trips(known[:2]) == 2  # known[2:4] re-read with them, the rest not
    assert trips(known[2:4]) == 1
    assert trips(known[4:6]) == 2  # not re-read with the first two: unwanted for 16 s


def test_long_reads_go_in_short_script_calls_that_join_into_one_calls_answer(make_store):
    """Read scripts carry at most SCRIPT_KEYS keys (Redis < 7.2 with CLIENT TRACKING pays
    n^2 for a script of n keys); the joined answers are exactly one long call's."""
    store = make_store(partitions=4, counters=CFG)
    items = list(range(150))
    store.put_item_attributes({i: {"genres": ["Drama" if i % 2 else "Comedy"]} for i in items},
                              ts=0)
    store.set_item_codes(7, {"rq": [1, 2]}, version="cb-1")
    store.apply_batch("clicks", 2, {"ts": [float(t) for t in range(60)],
                                    "user_id": [t % 5 for t in range(60)],
                                    "item_id": [t * 2 for t in range(60)],
                                    "label": [t % 2 for t in range(60)],
                                    "offset": list(range(60))})
    entities = [f"item:{i}" for i in items] + [f"user:{u}" for u in range(5)]
    fields = store.counters.state_fields
    cmds = store.read_cmds(entities, fields)
    assert [c[2] for c in cmds[:-1]] == [SCRIPT_KEYS] * (len(cmds) - 1)
    assert len(cmds) == -(-4 * len(entities) // SCRIPT_KEYS)
    chunked = store.shard_states(store._execute(cmds), store.counters.width)

    keys = [store.shard_key(p, e) for p in range(4) for e in entities]
    (one,) = store._execute([store.evalsha(READ, keys, fields)])
    whole = store.states(one, store.counters.width).reshape(4, len(entities), -1)
    np.testing.assert_array_equal(np.stack(chunked), whole)  # NaN where never written
    assert np.isfinite(whole).any()  # the clicks were read, not only absent keys

    item_cmds = store.items_cmds([str(i) for i in items])
    assert len(item_cmds) == -(-2 * len(items) // SCRIPT_KEYS)
    store.items_take([str(i) for i in items], store._execute(item_cmds), now=0.0)
    attrs, codes = store.items_out({"7", "8"})
    assert attrs["7"] == {"genres": ["Drama"]} and attrs["8"] == {"genres": ["Comedy"]}
    assert codes["7"] == {"rq": [1, 2]}
