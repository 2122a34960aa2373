"""Strict point in time across partitions, on the real redis-server (docs/point-in-time.md).

A row's pre-event counters hold only contributions with event time strictly before its
own (ties: a setting), from every partition's shard, however far apart in event time the
partitions are processed. Checked against a brute-force reference that keeps every
contribution ever applied with its event time.
"""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from features.counters import (
    CounterConfig,
    CounterSpec,
    aggregate,
    as_columns,
    derive_features,
    resolve_refs,
)

CFG = CounterConfig(
    specs=(
        CounterSpec("user", key=("user_id",)),
        CounterSpec("item", key=("item_id",)),
        CounterSpec("genre", key=("genre",)),
    ),
    half_lives=(3600.0, 86400.0),
)
ITEM = CounterConfig(specs=(CounterSpec("item", key=("item_id",)),), half_lives=(100.0,))


def _items(ml):
    return {i: {"genres": a["genres"], "year": a["year"]} for i, a in ml.items.items()}


def _partitioned(ml, n, partitions):
    """The first ``n`` MovieLens clicks, users hashed to partitions, offsets per partition."""
    c = ml.clicks
    part = np.asarray([hash(int(u)) % partitions for u in c["user_id"][:n]])
    out = {}
    for p in range(partitions):
        idx = np.flatnonzero(part == p)
        out[p] = {
            "event_id": c["event_id"][idx],
            "ts": c["ts"][idx],
            "user_id": c["user_id"][idx],
            "item_id": c["item_id"][idx],
            "label": c["label"][idx],
            "offset": np.arange(len(idx)),
            "sub": np.zeros(len(idx), np.int32),
        }
    return out


def _slice(cols, a, b):
    return {k: v[a:b] for k, v in cols.items()}


def _reference(cfg, batch, items, ref):
    refs = resolve_refs(cfg, as_columns(batch), items)
    pre = np.zeros((len(refs.event), cfg.width))
    # Other partitions are read as of batch start: the reference sees the same log, and
    # the batch's own events in offset order.
    for e in range(refs.n_events):
        rows = np.flatnonzero(refs.event == e)
        names = [refs.entities[k] for k in refs.entity[rows]]
        pre[rows] = ref.apply(names, float(batch["ts"][e]), int(batch["label"][e]))
    return derive_features(cfg, aggregate(refs, pre))


def _schedule(parts, batch):
    """Partition 2 first (all of its months), then 0 and 1 interleaved: far apart in time."""
    out = [(2, s) for s in range(0, len(parts[2]["ts"]), batch)]
    n = max(len(parts[0]["ts"]), len(parts[1]["ts"]))
    for s in range(0, n, batch):
        out += [(p, s) for p in (0, 1) if s < len(parts[p]["ts"])]
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_partitions_far_apart_in_event_time_see_only_the_past(
    make_store, ml, strict_reference, ties
):
    items = _items(ml)
    registry = CollectorRegistry()
    store = make_store(partitions=3, counters=CFG, pit_ties=ties, pit_history=100_000,
                       registry=registry)
    store.put_item_attributes(items, ts=0)
    parts = _partitioned(ml, 4000, 3)
    ref = strict_reference(CFG.half_lives, ties=ties)
    checked = 0
    for p, s in _schedule(parts, 250):
        batch = _slice(parts[p], s, s + 250)
        res = store.apply_batch("clicks", p, batch)
        want = _reference(CFG, batch, items, ref)
        assert res.valid.all()
        for k, v in want.items():
            np.testing.assert_allclose(res.features[k], v, rtol=1e-9, atol=1e-9, err_msg=k)
        checked += len(batch["ts"])
    assert checked == 4000
    assert registry.get_sample_value(
        "headwater_features_pit_truncated_total", {"topic": "clicks"}
    ) == 0


def test_a_row_never_sees_another_partition_s_later_click(make_store):
    store = make_store(partitions=2, counters=ITEM)
    store.apply_batch("clicks", 0, {"ts": [1000.0], "item_id": [7], "label": [1], "offset": [0]})
    res = store.apply_batch(
        "clicks", 1, {"ts": [100.0, 1000.0, 1100.0], "item_id": [7] * 3, "label": [0] * 3,
                      "offset": [0, 1, 2]},
    )
    # t=100: nothing yet; t=1000: a tie (excluded) and its own t=100; t=1100: both earlier.
    assert res.features["item_impressions_total"].tolist() == [0.0, 1.0, 3.0]
    assert res.features["item_clicks_total"].tolist() == [0.0, 0.0, 1.0]
    assert res.features["item_impressions_100s"][1] == pytest.approx(2 ** -9)
    assert res.features["item_impressions_100s"][2] == pytest.approx(2 ** -10 + 2 ** -1 + 2 ** -1)


@pytest.mark.parametrize("ties", [False, True])
def test_same_timestamp_bursts_across_batches_and_partitions(make_store, ties):
    store = make_store(partitions=2, counters=ITEM, pit_ties=ties)
    burst = {"ts": [50.0] * 4, "item_id": [7] * 4, "label": [1, 0, 1, 1]}
    first = store.apply_batch("clicks", 0, {**burst, "offset": [0, 1, 2, 3]})
    # The same second continues in the next batch of partition 0 and on partition 1.
    second = store.apply_batch(
        "clicks", 0, {"ts": [50.0, 50.0, 60.0], "item_id": [7] * 3, "label": [0, 1, 0],
                      "offset": [4, 5, 6]},
    )
    other = store.apply_batch(
        "clicks", 1, {"ts": [50.0, 60.0], "item_id": [7, 7], "label": [1, 1], "offset": [0, 1]}
    )
    got = [r.features["item_impressions_total"].tolist() for r in (first, second, other)]
    if ties:
        # Ties count: in its own partition those applied before it, elsewhere all of them.
        assert got == [[0, 1, 2, 3], [4, 5, 6], [6, 7 + 1]]
    else:
        assert got == [[0, 0, 0, 0], [0, 0, 6], [0, 6 + 1]]
    clicks = [r.features["item_clicks_total"].tolist() for r in (first, second, other)]
    assert clicks == ([[0, 1, 1, 2], [3, 3, 4], [4, 4 + 1]] if ties else
                      [[0, 0, 0, 0], [0, 0, 4], [0, 4 + 1]])


def test_a_row_older_than_the_retained_history_leaves_that_part_out(make_store, ml,
                                                                   strict_reference):
    """A short history: never the future, less than the reference only where counted."""
    # pit_history=4 keeps 4 to 7 events per entity and shard.
    items = _items(ml)
    registry = CollectorRegistry()
    store = make_store(partitions=3, counters=CFG, pit_history=4, registry=registry)
    store.put_item_attributes(items, ts=0)
    parts = _partitioned(ml, 3000, 3)
    ref = strict_reference(CFG.half_lives)
    under = 0
    for p, s in _schedule(parts, 250):
        batch = _slice(parts[p], s, s + 250)
        res = store.apply_batch("clicks", p, batch)
        want = _reference(CFG, batch, items, ref)
        for name in ("user", "item", "genre"):
            got_n = res.features[f"{name}_impressions_total"]
            assert (got_n <= want[f"{name}_impressions_total"] + 1e-9).all(), name
            assert (res.features[f"{name}_clicks_total"]
                    <= want[f"{name}_clicks_total"] + 1e-9).all(), name
            under += int((got_n < want[f"{name}_impressions_total"] - 1e-9).sum())
    truncated = registry.get_sample_value(
        "headwater_features_pit_truncated_total", {"topic": "clicks"}
    )
    assert under > 0 and truncated >= under


def test_history_is_bounded_and_folds_into_the_head(make_store, redis_db):
    import redis

    from features.asof import decode_history

    store = make_store(partitions=1, counters=ITEM, pit_history=2)
    ts = [10.0, 20.0, 30.0, 40.0, 50.0]
    # One event per batch or all in one: the same history (folds depend on counts only).
    store.apply_batch("clicks", 0, {"ts": ts[:1], "item_id": [7], "label": [1], "offset": [0]})
    store.apply_batch("clicks", 0, {"ts": ts[1:], "item_id": [7] * 4, "label": [0, 1, 1, 0],
                                    "offset": list(range(1, 5))})
    client = redis.Redis.from_url(redis_db)
    blob = client.get("{hw:p0}:~h2:item:7")
    other = make_store(partitions=1, counters=ITEM, pit_history=2, prefix="one")
    for k in range(5):
        other.apply_batch("clicks", 0, {"ts": ts[k:k + 1], "item_id": [7],
                                        "label": [[1, 0, 1, 1, 0][k]], "offset": [k]})
    assert client.get("{one:p0}:~h2:item:7") == blob
    client.close()
    head, entries = decode_history(blob, ITEM.width)
    assert entries.tolist() == [[30.0, 1.0, 1.0], [40.0, 1.0, 1.0], [50.0, 1.0, 0.0]]
    assert head[:2].tolist() == [2.0, 1.0] and head[ITEM.width] == 20.0
    assert head[2] == pytest.approx(2 ** -0.1 + 1) and head[3] == pytest.approx(2 ** -0.1)
    # A row between the head and the entries is exact; older than the head it is cut.
    res = store.apply_batch("clicks", 0, {"ts": [35.0, 15.0], "item_id": [7, 7],
                                          "label": [0, 0], "offset": [5, 6]})
    assert res.features["item_impressions_total"].tolist() == [3.0, 0.0]
