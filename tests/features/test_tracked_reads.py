"""Serving's tracked feature cache against a real redis-server: Redis says which keys
changed (``CLIENT TRACKING``), and a cached read answers what a fresh read answers after
every write, through a lost invalidation channel and a Redis restart."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis

from core.redis_client import RoundTrips, connect_async
from core.redis_tracking import CHANNEL
from features.read_cache import ReadCache
from features.store import OnlineStore
from headwater.servers import start_redis
from tests.features.counter_cfg import CFG
from tests.stackutil import wait_until_async


async def _settle(inv, url: str) -> None:
    """Every invalidation Redis sent so far has reached the listener: a message published
    on the channel after them arrives after them."""
    seen = inv.other
    client = redis.Redis.from_url(url)
    try:
        client.publish(CHANNEL, b"barrier")
    finally:
        client.close()
    await wait_until_async(lambda: inv.other > seen, what="the barrier message arrived")


class _Stores:
    def __init__(self, url: str, partitions: int = 2) -> None:
        self.url = url
        self.client = connect_async(url, decode_responses=False)
        self.plain = RoundTrips.for_url(url, callbacks=self.client.response_callbacks)
        self.tracked_rt = RoundTrips.for_url(url, callbacks=self.client.response_callbacks,
                                             tracking=True)
        self.inv = self.tracked_rt.invalidations
        self.fresh = OnlineStore(self.client, self.plain, partitions=partitions, counters=CFG)
        self.tracked = OnlineStore(self.client, self.tracked_rt, partitions=partitions,
                                   counters=CFG)
        # the tests read at event times hours apart: keep entries for the whole test
        self.tracked.read_cache.max_age = 1e9

    async def live(self) -> None:
        await self.tracked.get_online_features([{"user_id": 0, "item_id": 0}], now=0.0)
        await wait_until_async(lambda: self.inv.live, what="the invalidation listener subscribed")

    async def close(self) -> None:
        self.plain.close()
        self.tracked_rt.close()
        await self.client.aclose()


@pytest.fixture
async def stores(redis_db):
    s = _Stores(redis_db)
    try:
        yield s
    finally:
        await s.close()


def _events(rng, n: int, ts0: float, offset0: int) -> dict:
    return {"ts": np.sort(rng.uniform(ts0, ts0 + 500, n)), "user_id": rng.integers(1, 8, n),
            "item_id": rng.integers(1, 30, n), "label": rng.integers(0, 2, n),
            "offset": np.arange(offset0, offset0 + n),
            "user": [{"age": int(a)} for a in rng.integers(18, 60, n)]}


async def _apply(store: OnlineStore, ev: dict) -> None:
    for p in (0, 1):
        sel = np.flatnonzero(ev["user_id"] % 2 == p)
        await store.apply_batch("clicks", p, {k: (v[sel] if isinstance(v, np.ndarray)
                                                  else [v[i] for i in sel]) for k, v in ev.items()})


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], np.ndarray):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, err_msg=k)
        else:
            assert got[k] == want[k], k


async def test_tracked_reads_answer_what_fresh_reads_answer_after_every_write(stores):
    await stores.fresh.put_item_attributes(
        {i: {"genres": ["Comedy", "Drama", "War"][: 1 + i % 3]} for i in range(1, 30)}, ts=0.0)
    await stores.live()
    rng = np.random.default_rng(3)
    rows = [{"user_id": u, "item_id": i} for u in (1, 2, 3, 99) for i in (1, 2, 7, 25, 1000)]
    offset = 0
    for round_ in range(6):
        ts0 = 1000.0 * round_
        if round_ % 2 == 0:  # writes every other round: the odd rounds are all hits
            ev = _events(rng, 60, ts0, offset)
            offset += 60
            await _apply(stores.fresh, ev)
            await _settle(stores.inv, stores.url)
        for now in (ts0 + 600.0, ts0 + 900.0):
            _close(await stores.tracked.get_online_features(rows, now=now),
                   await stores.fresh.get_online_features(rows, now=now))
    cache = stores.tracked.read_cache
    assert cache.hits > cache.misses  # most reads were answered from memory
    assert cache.user_hits > 0
    assert stores.inv.keys > 0  # and the writes were invalidated, not waited out


async def test_an_all_cached_read_makes_no_round_trip(stores):
    await _apply(stores.fresh, _events(np.random.default_rng(1), 40, 0.0, 0))
    await stores.live()
    rows = {"user_id": [3] * 4, "item_id": [1, 2, 3, 4]}
    first = await stores.tracked.get_online_features(rows, now=700.0)
    trips = stores.tracked.round_trips
    again = await stores.tracked.get_online_features(rows, now=700.0)
    assert stores.tracked.round_trips == trips
    _close(again, first)


async def test_a_user_attribute_change_is_seen_on_the_next_read(stores):
    await stores.live()
    ev = {"ts": [1.0], "user_id": [5], "item_id": [1], "label": [1], "offset": [0],
          "user": [{"age": 30}]}
    await stores.fresh.apply_batch("clicks", 1, ev)
    await _settle(stores.inv, stores.url)
    rows = [{"user_id": 5, "item_id": 1}]
    assert (await stores.tracked.get_online_features(rows, now=2.0))["user_attrs"] == [{"age": 30}]
    await stores.tracked.get_online_features(rows, now=2.0)
    assert stores.tracked.read_cache.user_hits == 1
    await stores.fresh.apply_batch("clicks", 1, {**ev, "offset": [1], "ts": [3.0],
                                                 "user": [{"age": 31}]})
    await _settle(stores.inv, stores.url)
    got = await stores.tracked.get_online_features(rows, now=4.0)
    assert got["user_attrs"] == [{"age": 31}]
    assert got["user_impressions_total"].tolist() == [2.0]


async def test_a_lost_invalidation_channel_empties_the_cache_and_tracking_comes_back(stores):
    await _apply(stores.fresh, _events(np.random.default_rng(2), 40, 0.0, 0))
    await stores.live()
    rows = [{"user_id": u, "item_id": 3} for u in (1, 2)]
    await stores.tracked.get_online_features(rows, now=600.0)
    assert stores.tracked.read_cache.stats()["entities"] > 0
    generation, opened = stores.inv.generation, stores.tracked_rt.opened
    killer = redis.Redis.from_url(stores.url)
    try:
        assert killer.client_kill_filter(_id=stores.inv.client_id) == 1
    finally:
        killer.close()
    await wait_until_async(lambda: not stores.inv.live or stores.inv.generation > generation,
                           what="the listener noticed it was killed")
    assert stores.tracked.read_cache.stats()["entities"] == 0 or stores.inv.generation > generation
    # a write while nothing tracks: it must show, cached or not
    await stores.fresh.apply_batch("clicks", 1, {"ts": [650.0], "user_id": [1], "item_id": [3],
                                                 "label": [1], "offset": [40]})
    _close(await stores.tracked.get_online_features(rows, now=700.0),
           await stores.fresh.get_online_features(rows, now=700.0))
    await wait_until_async(lambda: stores.inv.generation > generation and stores.inv.live,
                           what="a new listener subscribed")
    await stores.tracked.get_online_features(rows, now=700.0)
    assert stores.tracked_rt.opened > opened  # the old connection redirected to a gone client
    await stores.fresh.apply_batch("clicks", 1, {"ts": [710.0], "user_id": [1], "item_id": [3],
                                                 "label": [0], "offset": [41]})
    await _settle(stores.inv, stores.url)
    _close(await stores.tracked.get_online_features(rows, now=720.0),
           await stores.fresh.get_online_features(rows, now=720.0))


async def test_a_redis_restart_never_serves_the_old_servers_states(tmp_path):
    server = start_redis(log_path=tmp_path / "redis1.log")
    port, url = server.port, server.extra["url"]
    s = _Stores(url)
    try:
        await _apply(s.fresh, _events(np.random.default_rng(4), 50, 0.0, 0))
        await s.live()
        rows = [{"user_id": u, "item_id": i} for u in (1, 2) for i in (1, 2, 3)]
        before = await s.tracked.get_online_features(rows, now=600.0)
        assert before["user_impressions_total"].sum() > 0
        server.stop()
        await wait_until_async(lambda: not s.inv.live, what="the listener lost Redis")
        server = start_redis(port=port, log_path=tmp_path / "redis2.log")  # empty
        w = _Stores(url)  # a writer and reference reader on the new server
        try:
            await w.fresh.apply_batch("clicks", 0, {"ts": [10.0], "user_id": [2], "item_id": [1],
                                                    "label": [1], "offset": [0]})

            async def read():
                for _ in range(100):  # the store's callers retry a dropped connection
                    try:
                        return await s.tracked.get_online_features(rows, now=600.0)
                    except redis.exceptions.ConnectionError:
                        await asyncio.sleep(0.05)
                raise AssertionError("no read after the restart")
            got = await read()
            _close(got, await w.fresh.get_online_features(rows, now=600.0))
            assert got["user_impressions_total"].tolist() == [0, 0, 0, 1, 1, 1]
        finally:
            await w.close()
    finally:
        await s.close()
        server.stop()


async def test_a_server_that_refuses_tracking_is_read_as_before(redis_db):
    admin = redis.Redis.from_url(redis_db)
    admin.acl_setuser("notrack", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-client"])
    try:
        url = redis_db.replace("redis://", "redis://notrack:pw@")
        s = _Stores(url)
        try:
            await _apply(s.fresh, _events(np.random.default_rng(5), 30, 0.0, 0))
            rows = [{"user_id": 1, "item_id": 2}]
            for now in (600.0, 601.0):
                await s.tracked.get_online_features(rows, now=now)
            await wait_until_async(lambda: s.inv.error is not None, what="the refusal was noticed")
            assert not s.inv.live
            _close(await s.tracked.get_online_features(rows, now=602.0),
                   await s.fresh.get_online_features(rows, now=602.0))
            assert s.tracked.read_cache.stats()["tracking"] == "refused"
        finally:
            await s.close()
    finally:
        admin.acl_deluser("notrack")
        admin.close()


class _Live:
    """Stands for core.redis_tracking.Invalidations in the cache's unit tests."""

    live, generation, error = True, 1, None

    def subscribe(self, callback) -> None:
        self.callback = callback


def _cache() -> ReadCache:
    c = ReadCache(CFG, ttl=0.0, prefix="hw")
    c.track(_Live())
    return c


def test_an_entity_invalidated_while_its_read_is_in_flight_is_used_once_not_kept():
    c = _cache()
    token = c.begin()
    hit = c.split(["user:1", "item:2"], now=100.0)
    shard = np.zeros((2, CFG.width + 1))
    shard[:, CFG.width] = 90.0
    c.tracker.callback([b"{hw:p0}:item:2"])  # changed after Redis answered
    c.decayed(hit, [shard], now=100.0, token=token)
    c.end(token)
    assert c.split(["user:1", "item:2"], now=101.0).miss == ["item:2"]
    assert c._dropped == {}  # nothing in flight: nothing remembered


def test_a_listener_lost_or_replaced_during_a_read_keeps_nothing_of_it():
    for change in ("reset", "generation"):
        c = _cache()
        token = c.begin()
        hit = c.split(["user:1"], now=100.0)
        if change == "reset":
            c.tracker.callback(None)
        else:
            c.tracker.generation = 2
        shard = np.zeros((1, CFG.width + 1))
        c.decayed(hit, [shard], now=100.0, token=token)
        c.end(token)
        assert c.split(["user:1"], now=100.5).miss == ["user:1"], change


def test_a_state_stamped_after_the_read_time_is_not_kept():
    c = _cache()
    token = c.begin()
    hit = c.split(["item:1", "item:2"], now=100.0)
    shard = np.ones((2, CFG.width + 1))
    shard[:, CFG.width] = [99.0, 105.0]  # item 2's last event is ahead of serving's clock
    c.decayed(hit, [shard], now=100.0, token=token)
    c.end(token)
    assert c.split(["item:1", "item:2"], now=110.0).miss == ["item:2"]


def test_a_changed_shared_entity_lags_by_the_ttl_at_most_and_a_users_not_at_all():
    clock = [100.0]
    c = ReadCache(CFG, ttl=0.5, prefix="hw", clock=lambda: clock[0])
    c.track(_Live())
    token = c.begin()
    names = ["user:1", "item:2", "user_genre:1|Drama"]
    hit = c.split(names, now=100.0)
    shard = np.zeros((3, CFG.width + 1))
    c.decayed(hit, [shard], now=100.0, token=token)
    c.end(token)
    c.tracker.callback([b"{hw:p1}:item:2", b"{hw:p0}:user:1", b"{hw:p0}:user_genre:1|Drama"])
    assert c.split(names, now=100.4).miss == ["user:1", "user_genre:1|Drama"]
    assert c.split(names, now=100.6).miss == names  # the item: read again after the TTL
    # an unchanged shared entity stays past the TTL
    token = c.begin()
    hit = c.split(["item:3"], now=101.0)
    c.decayed(hit, [np.zeros((1, CFG.width + 1))], now=101.0, token=token)
    c.end(token)
    assert c.split(["item:3"], now=130.0).miss == []


def test_overlapping_reads_each_drop_only_what_changed_during_their_own_flight():
    """Under steady load some read is always in flight: what is remembered for them is
    pruned as the oldest ones end, and each read drops only its own flight's changes."""
    c = _cache()
    shard = np.zeros((2, CFG.width + 1))
    a = c.begin()
    c.tracker.callback([b"{hw:p0}:item:1"])
    b = c.begin()  # begins after item 1 changed: its answer has the new item 1
    c.tracker.callback([b"{hw:p0}:item:2"])
    c.end(a)
    hit = c.split(["item:1", "item:2"], now=10.0)
    c.decayed(hit, [shard], now=10.0, token=b)
    assert c.split(["item:1", "item:2"], now=11.0).miss == ["item:2"]
    for k in range(1000):  # always one read open
        nxt = c.begin()
        c.tracker.callback([f"{{hw:p0}}:item:{k % 50}".encode()])
        c.end(b)
        b = nxt
    assert len(c._dropped) <= 2 and len(c._open) == 1
    c.end(b)
    assert not c._dropped and not c._open


def test_a_full_cache_forgets_its_oldest_half_not_everything():
    c = ReadCache(CFG, ttl=0.0, prefix="hw", max_entities=10)
    c.track(_Live())
    for k in range(30):
        token = c.begin()
        hit = c.split([f"item:{k}"], now=1.0)
        c.decayed(hit, [np.zeros((1, CFG.width + 1))], now=1.0, token=token)
        c.end(token)
        assert len(c.cached()) <= 11
    kept = set(c.cached())
    assert "item:29" in kept and "item:0" not in kept and len(kept) >= 5


async def test_a_listener_id_the_server_does_not_know_replaces_the_listener_not_tracking(stores):
    """After a Redis restart a data connection may reach the new server before the
    listener has seen its own connection drop: its redirect names an id the server does
    not know. That is no refusal: a new listener subscribes and reads are tracked again."""
    await _apply(stores.fresh, _events(np.random.default_rng(6), 30, 0.0, 0))
    await stores.live()
    inv, generation, resets = stores.inv, stores.inv.generation, stores.inv.resets
    inv.client_id = 987_654_321  # what the listener believes; the server has no such client
    idle = stores.tracked_rt._idle  # the next read opens a connection, which redirects to it
    while idle:
        idle.pop()[1].close()
    rows = [{"user_id": 1, "item_id": 2}]
    _close(await stores.tracked.get_online_features(rows, now=600.0),
           await stores.fresh.get_online_features(rows, now=600.0))
    assert inv.error is None and inv.resets > resets  # replaced, not refused
    await wait_until_async(lambda: inv.live and inv.generation > generation, what="a new listener")
    await stores.tracked.get_online_features(rows, now=600.0)  # tracked again: cached
    hits = stores.tracked.read_cache.hits
    await stores.tracked.get_online_features(rows, now=600.0)
    assert stores.tracked.read_cache.hits > hits
