"""One contract suite for every online store (Feast style): the Redis store on a real
redis-server and the in-memory one (features/memory_store.py) must keep the same
promises (features/store_protocol.py)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from features.counters import CounterConfig, CounterSpec
from features.memory_store import MemoryOnlineStore
from features.store import OnlineStore
from features.store_apply import GapError, RewindError
from features.store_protocol import OnlineFeatureStore

HALF_LIVES = (3600.0, 86400.0)
COUNTERS = CounterConfig(specs=(CounterSpec("user", key=("user_id",)),
                                CounterSpec("item", key=("item_id",)),
                                CounterSpec("genre", key=("genre",))),
                         half_lives=HALF_LIVES)


@pytest.fixture(params=["redis", "memory"])
def make(request, redis_db):
    """``make(**options)`` -> a fresh store of the kind under test; run coroutines with ``run``."""
    loop = asyncio.new_event_loop()
    clients = []

    def build(**options):
        options.setdefault("partitions", 2)
        options.setdefault("counters", COUNTERS)
        if request.param == "memory":
            return MemoryOnlineStore(**options)
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_db, decode_responses=False)
        clients.append(client)
        return OnlineStore(client, **options)

    build.run = loop.run_until_complete
    build.kind = request.param
    yield build
    for client in clients:
        loop.run_until_complete(client.aclose())
    loop.close()


def click(offset, ts, user="u1", item="i1", label=1, event_id=None, sub=0, user_attrs=None):
    return {"offset": offset, "sub": sub, "ts": float(ts), "user_id": user, "item_id": item,
            "label": label, "event_id": event_id or f"e{offset}.{sub}", "user": user_attrs}


def expected(history, ts, ties=False):
    """Brute force: contributions strictly before ``ts`` (or at it), decayed to it."""
    n = c = 0.0
    decayed = [[0.0, 0.0] for _ in HALF_LIVES]
    for t, label, *imp in history:
        k = imp[0] if imp else 1  # (ts, label) or (ts, label, impressions)
        if t < ts or (ties and t == ts):
            n += k
            c += label
            for j, h in enumerate(HALF_LIVES):
                w = math.pow(2.0, -(ts - t) / h)
                decayed[j][0] += k * w
                decayed[j][1] += label * w
    return n, c, decayed


def user_pre(result, i):
    f = result.features
    return (f["user_impressions_total"][i], f["user_clicks_total"][i],
            [[f["user_impressions_1h"][i], f["user_clicks_1h"][i]],
             [f["user_impressions_1d"][i], f["user_clicks_1d"][i]]])


def assert_pre(result, i, want):
    n, c, decayed = user_pre(result, i)
    assert (n, c) == want[:2]
    np.testing.assert_allclose(decayed, want[2], rtol=1e-9, atol=1e-12)


def test_keeps_the_protocol(make):
    store = make()
    assert isinstance(store, OnlineFeatureStore)
    assert isinstance(make.run(store.instance_id()), str)
    assert make.run(store.instance_id()) == make.run(store.instance_id())


def test_counters_sum_every_partition_decayed_to_the_read_time(make):
    store = make()
    make.run(store.apply_batch("clicks", 0, [click(0, 1000, label=1), click(1, 2000, label=0)]))
    make.run(store.apply_batch("clicks", 1, [click(0, 3000, label=1)]))
    doc = make.run(store.entity_features("user:u1", now=5000))
    history = [(1000, 1), (2000, 0), (3000, 1)]
    n, c, decayed = expected(history, 5000)
    assert (doc["impressions_total"], doc["clicks_total"]) == (3, 2)
    assert doc["impressions_by_partition"] == {0: 2, 1: 1}
    assert doc["updated_at"] == 3000
    assert doc["impressions_1h"] == pytest.approx(decayed[0][0], rel=1e-9)
    assert doc["clicks_1d"] == pytest.approx(decayed[1][1], rel=1e-9)
    assert doc["ctr_total"] == pytest.approx((2 + 5 * 0.5) / (3 + 5))
    read = make.run(store.get_online_features([{"user_id": "u1", "item_id": "i1"},
                                               {"user_id": "nobody", "item_id": "i1"}], now=5000))
    assert read["user_impressions_total"].tolist() == [3, 0]
    assert read["item_clicks_total"].tolist() == [2, 2]
    assert read["user_impressions_1h"][0] == pytest.approx(decayed[0][0], rel=1e-9)
    assert read["user_ctr_total"][1] == pytest.approx(0.5), "no history: the prior"
    with pytest.raises(KeyError):
        make.run(store.get_online_features([{"user_id": "u1"}], features=["no_such_feature"]))
    with pytest.raises(ValueError):
        make.run(store.entity_features("nonsense"))


def test_pre_event_features_are_strictly_point_in_time(make):
    store = make()
    # Partition 1 is far ahead in event time: none of it may reach partition 0's rows.
    make.run(store.apply_batch("clicks", 1, [click(0, 9000, label=1), click(1, 500, label=1)]))
    events = [click(0, 1000, label=1), click(1, 2000, label=0), click(2, 2000, label=1),
              click(3, 1500, label=1)]  # the last is late: older than the user's state
    result = make.run(store.apply_batch("clicks", 0, events))
    other = [(9000, 1), (500, 1)]
    own: list[tuple[float, int]] = []
    for i, ev in enumerate(events):
        assert_pre(result, i, expected(own + other, ev["ts"]))
        own.append((ev["ts"], ev["label"]))
    assert result.late.tolist() == [False, False, False, True] and result.late_count == 1
    assert result.valid.all() and not result.replayed.any() and result.next_offset == 4


def test_clicks_counted_at_their_own_time_without_an_impression(make):
    """The joiner's events: an impression when shown (impressions 1, label 0), its click
    later at the click's time (impressions 0, label 1). Every row sees exactly the
    contributions before it, clicks included, never a click after it; histories small
    enough to fold (Redis) keep it exact."""
    store = make(pit_history=2)

    def ev(offset, ts, label, imp):
        return {**click(offset, ts, label=label), "impressions": imp}

    make.run(store.apply_batch("clicks", 1, [ev(0, 1300, 1, 0), ev(1, 900, 0, 1)]))
    first = [ev(0, 1000, 0, 1), ev(1, 1100, 0, 1), ev(2, 1200, 1, 0), ev(3, 1250, 0, 1),
             ev(4, 1150, 1, 0)]  # the last: a click older than the user's state
    second = [ev(5, 1400, 1, 0), ev(6, 1400, 0, 1), ev(7, 1600, 1, 1), ev(8, 1500, 1, 0),
              ev(9, 1700, 0, 1)]
    other = [(1300, 1, 0), (900, 0, 1)]
    own: list[tuple[float, int, int]] = []
    for batch in (first, second):
        result = make.run(store.apply_batch("clicks", 0, batch))
        for i, e in enumerate(batch):
            assert_pre(result, i, expected(own + other, e["ts"]))
            own.append((e["ts"], e["label"], e["impressions"]))
    n, c, decayed = expected(own + other, 5000)
    doc = make.run(store.entity_features("user:u1", now=5000))
    assert (doc["impressions_total"], doc["clicks_total"]) == (n, c) == (7, 6)
    assert doc["impressions_1h"] == pytest.approx(decayed[0][0], rel=1e-9)
    assert doc["clicks_1h"] == pytest.approx(decayed[0][1], rel=1e-9)
    with pytest.raises(ValueError, match="impressions"):
        make.run(store.apply_batch("clicks", 0, [ev(10, 1800, 1, 2)]))


def test_ties_count_when_asked(make):
    store = make(pit_ties=True)
    result = make.run(store.apply_batch("clicks", 0, [click(0, 100, label=1), click(1, 100, label=0)]))
    assert_pre(result, 1, expected([(100, 1)], 100, ties=True))
    assert result.features["user_impressions_total"].tolist() == [0, 1]


def test_results_follow_the_input_order(make):
    store = make()
    result = make.run(store.apply_batch("clicks", 0, [click(1, 200, user="b"), click(0, 100, user="a"),
                                                      click(2, 300, user="a")]))
    assert result.features["user_impressions_total"].tolist() == [0, 0, 1]


def test_a_replayed_batch_changes_nothing_and_gets_its_first_features(make):
    store = make()
    events = [click(0, 100, label=1), click(1, 200, label=0), click(1, 210, label=1, sub=1)]
    first = make.run(store.apply_batch("clicks", 0, events))
    before = make.run(store.entity_features("user:u1", now=1000))
    again = make.run(store.apply_batch("clicks", 0, events))
    assert make.run(store.entity_features("user:u1", now=1000)) == before
    assert again.replayed.all() and again.valid.all() and again.duplicate_count == 3
    for name, values in first.features.items():
        np.testing.assert_array_equal(again.features[name], values, err_msg=name)
    # Overlapping a replay with new events: only the new ones count.
    more = make.run(store.apply_batch("clicks", 0, events[1:] + [click(2, 300, label=1)]))
    assert more.replayed.tolist() == [True, True, False] and more.next_offset == 3
    assert make.run(store.entity_features("user:u1", now=1000))["impressions_total"] == 4
    assert more.features["user_impressions_total"][2] == 3
    assert make.run(store.next_offsets(0)) == {"clicks": 3}
    assert make.run(store.next_offsets(1)) == {}


def test_a_replay_older_than_the_replay_cache_builds_no_row(make):
    store = make(replay_batches=1)
    make.run(store.apply_batch("clicks", 0, [click(0, 100)]))
    make.run(store.apply_batch("clicks", 0, [click(1, 200)]))
    old = make.run(store.apply_batch("clicks", 0, [click(0, 100)]))
    assert old.valid.tolist() == [False] and old.replayed.tolist() == [True]
    assert make.run(store.entity_features("user:u1"))["impressions_total"] == 2


def test_a_gap_is_refused_and_nothing_is_written(make):
    store = make()
    make.run(store.apply_batch("clicks", 0, [click(0, 100)]))
    with pytest.raises(GapError) as gap:
        make.run(store.apply_batch("clicks", 0, [click(5, 200)], expect_next=5))
    assert (gap.value.recorded, gap.value.expected) == (1, 5)
    assert make.run(store.next_offsets(0)) == {"clicks": 1}
    assert make.run(store.entity_features("user:u1"))["impressions_total"] == 1
    ok = make.run(store.apply_batch("clicks", 0, [click(1, 200)], expect_next=1))
    assert ok.next_offset == 2


def test_an_offset_holding_another_event_is_a_rewind(make):
    store = make()
    make.run(store.apply_batch("clicks", 0, [click(0, 100, event_id="first")]))
    with pytest.raises(RewindError):
        make.run(store.apply_batch("clicks", 0, [click(0, 100, event_id="other")]))
    assert make.run(store.entity_features("user:u1"))["impressions_total"] == 1


def test_item_attributes_drive_counters_and_newer_writes_win(make):
    store = make()
    assert make.run(store.put_item_attributes({"i1": {"genres": ["Comedy"], "year": 1995}}, ts=100)) == 1
    assert make.run(store.put_item_attributes({"i1": {"genres": ["Drama"]}}, ts=50)) == 0
    assert make.run(store.get_item_attributes_many(["i1", "i2"])) == [
        {"genres": ["Comedy"], "year": 1995}, None]
    result = make.run(store.apply_batch("clicks", 0, [click(0, 200, item="i1"), click(1, 300, item="i1")]))
    assert result.item_attrs["i1"]["genres"] == ["Comedy"]
    assert result.features["genre_impressions_total"].tolist() == [0, 1]
    assert make.run(store.entity_features("genre:Comedy"))["impressions_total"] == 2
    assert make.run(store.entity_features("item:i1"))["attributes"]["year"] == 1995


def test_user_attributes_come_from_the_newest_event(make):
    store = make()
    make.run(store.apply_batch("clicks", 0, [click(0, 200, user_attrs={"age": 30}),
                                             click(1, 100, user_attrs={"age": 20})]))
    assert make.run(store.get_user_attributes_many(["u1", "u2"])) == [{"age": 30}, None]
    read = make.run(store.get_online_features([{"user_id": "u1", "item_id": "i1"}], now=300))
    assert read["user_attrs"] == [{"age": 30}]


def test_item_codes_are_stored_with_their_version(make):
    store = make()
    make.run(store.set_item_codes("i1", {"rq": [1, 2], "vq": [3]}, "v7"))
    assert make.run(store.get_item_codes_many(["i1", "i9"])) == [{"rq": [1, 2], "vq": [3]}, None]
    doc = make.run(store.entity_features("item:i1"))
    assert (doc["codes"], doc["codes_version"]) == ({"rq": [1, 2], "vq": [3]}, "v7")
    read = make.run(store.get_online_features([{"user_id": "u", "item_id": "i1"}], now=1.0))
    assert read["codes"] == [{"rq": [1, 2], "vq": [3]}]


def test_recent_clicks_are_point_in_time_from_every_partition(make):
    """Each event's sequence: the user's newest clicks strictly before it in event time
    among those applied before it (earlier batches of every partition, earlier events of
    its batch); never itself, a tie or a later click, whatever the arrival order."""
    L = 3
    store = make(seq_len=L)
    rng = np.random.default_rng(7)
    applied: list[dict] = []  # every event of earlier batches and the current one
    nxt = {0: 0, 1: 0}
    for _ in range(8):
        p = int(rng.integers(2))
        batch = []
        for _ in range(int(rng.integers(1, 6))):
            batch.append(click(nxt[p], int(rng.integers(0, 12)) * 10, user=f"u{rng.integers(2)}",
                               item=f"i{rng.integers(50)}", label=int(rng.random() < 0.6)))
            nxt[p] += 1
        result = make.run(store.apply_batch("clicks", p, batch))
        for i, ev in enumerate(batch):
            before = sorted((e["ts"], f"{e['offset']}:{e['sub']}:{e['item_id']}")
                            for e in applied + batch[:i]
                            if e["user_id"] == ev["user_id"] and e["label"] and e["ts"] < ev["ts"])
            assert result.sequences[i] == tuple(m.split(":")[2] for _, m in before[-L:]), (p, i)
        applied += [{**ev, "p": p} for ev in batch]
    for u in ("u0", "u1"):  # fewer clicks per user and partition than the store keeps (4 L)
        assert sum(e["user_id"] == u and e["label"] and e["p"] == 0 for e in applied) <= 4 * L
    read = make.run(store.get_online_features([{"user_id": "u0", "item_id": "i1"},
                                               {"user_id": "nobody", "item_id": "i1"}], now=55))
    clicks = sorted((e["ts"], f"{e['offset']}:{e['sub']}:{e['item_id']}") for e in applied
                    if e["user_id"] == "u0" and e["label"] and e["ts"] < 55)
    assert read["user_seq"] == [tuple(m.split(":")[2] for _, m in clicks[-L:]), ()]


def test_a_replayed_batch_gets_its_first_sequences_and_stores_nothing_twice(make):
    store = make(seq_len=2)
    events = [click(0, 100, item="a"), click(1, 200, item="b", label=0), click(2, 300, item="c"),
              click(3, 400, item="d")]
    first = make.run(store.apply_batch("clicks", 0, events))
    assert first.sequences == [(), ("a",), ("a",), ("a", "c")]
    read = make.run(store.get_online_features([{"user_id": "u1", "item_id": "x"}], now=1000))
    assert read["user_seq"] == [("c", "d")]
    again = make.run(store.apply_batch("clicks", 0, events))
    assert again.replayed.all() and again.sequences == first.sequences
    later = make.run(store.apply_batch("clicks", 0, [click(4, 350, item="e")]))
    assert later.sequences == [("a", "c")]  # the late click sees no later one
    read = make.run(store.get_online_features([{"user_id": "u1", "item_id": "x"}], now=400))
    assert read["user_seq"] == [("c", "e")]  # d is at the read time: not before it
