"""Serving's feature reads over ``core.redis_client.RoundTrips`` against a real redis-server:
the same answers as redis-py's pipeline, errors in place, broken and cancelled
connections never reused."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.redis_client import RoundTrips, connect_async
from features.store import OnlineStore
from tests.features.counter_cfg import CFG


@pytest.fixture
async def both(redis_db):
    """A store reading through redis-py's pipeline and one through RoundTrips, same Redis."""
    client = connect_async(redis_db, decode_responses=False)
    transport = RoundTrips.for_url(redis_db, callbacks=client.response_callbacks)
    assert transport is not None
    piped = OnlineStore(client, partitions=2, counters=CFG)
    direct = OnlineStore(client, transport, partitions=2, counters=CFG)
    try:
        yield piped, direct, transport
    finally:
        transport.close()
        await client.aclose()


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


async def test_reads_answer_exactly_what_the_pipeline_answers(both):
    piped, direct, transport = both
    await piped.put_item_attributes({i: {"genres": ["Comedy", "Drama"][: 1 + i % 2]}
                                     for i in range(1, 30)}, ts=0.0)
    rng = np.random.default_rng(0)
    n = 400
    ev = {"ts": np.sort(rng.uniform(0, 5000, n)), "user_id": rng.integers(1, 20, n),
          "item_id": rng.integers(1, 40, n), "label": rng.integers(0, 2, n),
          "offset": np.arange(n), "user": [{"age": int(a)} for a in rng.integers(18, 60, n)]}
    for p in (0, 1):
        sel = np.flatnonzero(ev["user_id"] % 2 == p)
        await piped.apply_batch("clicks", p, {k: (v[sel] if isinstance(v, np.ndarray)
                                                  else [v[i] for i in sel]) for k, v in ev.items()})
    rows = [{"user_id": u, "item_id": i} for u in (3, 4, 99) for i in (1, 2, 7, 35, 1000)]
    for now in (5000.0, 9000.0):
        _same(await piped.get_online_features(rows, now=now), await direct.get_online_features(rows, now=now))
    one_user = {"user_id": [3] * 6, "item_id": [1, 2, 7, 35, 1000, 2]}
    _same(await piped.get_online_features(one_user, now=6000.0),
          await direct.get_online_features(one_user, now=6000.0))
    assert transport.opened == 1  # one connection, reused


async def test_error_replies_come_back_in_place_as_redis_py_exceptions(both, redis_db):
    _, _, transport = both
    pipe_client = aioredis.Redis.from_url(redis_db, decode_responses=False)
    cmds = [("SET", "rt:k", "v"), ("HGETALL", "rt:k"), ("EVALSHA", "0" * 40, 0), ("GET", "rt:k")]
    try:
        pipe = pipe_client.pipeline(transaction=False)
        for c in cmds:
            pipe.execute_command(*c)
        want = await pipe.execute(raise_on_error=False)
    finally:
        await pipe_client.aclose()
    got = await transport.execute(cmds)
    assert [type(r) for r in got] == [type(r) for r in want]
    assert isinstance(got[1], ResponseError) and "WRONGTYPE" in str(got[1])
    assert isinstance(got[2], NoScriptError)
    assert got[3] == want[3] == b"v"


async def test_flushed_scripts_are_loaded_again(both):
    piped, direct, _ = both
    await piped.apply_batch("clicks", 0, {"ts": [1.0], "user_id": [1], "item_id": [2], "label": [1],
                                          "offset": [0]})
    await direct.client.script_flush()
    got = await direct.get_online_features([{"user_id": 1, "item_id": 2}], now=1.0)
    assert got["user_clicks_total"].tolist() == [1.0]


async def test_a_connection_the_server_dropped_raises_once_then_a_new_one_answers(both, redis_db):
    _, _, transport = both
    (cid,) = await transport.execute([("CLIENT", "ID")])
    killer = redis.Redis.from_url(redis_db)
    try:
        assert killer.client_kill_filter(_id=cid) == 1
    finally:
        killer.close()
    with pytest.raises(RedisConnectionError):  # the store's callers retry exactly these
        await transport.execute([("PING",)])
    assert await transport.execute([("PING",)]) == [True]  # redis-py's answer to PING
    assert transport.opened == 2


async def test_a_cancelled_round_trip_never_hands_its_connection_on(both):
    _, _, transport = both
    await transport.execute([("PING",)])
    task = asyncio.ensure_future(transport.execute([("BLPOP", "rt:never", 5)]))
    await asyncio.sleep(0.2)  # the command is sent; its answer is not due for 5 s
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the next round trip cannot read BLPOP's late answer: it gets a new connection
    assert await transport.execute([("ECHO", "mine")]) == [b"mine"]
    assert transport.opened == 2


async def test_a_server_that_does_not_answer_in_time_is_a_timeout(both):
    _, _, transport = both
    transport.timeout = 0.2
    with pytest.raises(RedisTimeoutError):  # also one the store's callers retry
        await transport.execute([("BLPOP", "rt:never", 2)])
    transport.timeout = 5.0
    assert await transport.execute([("ECHO", "next")]) == [b"next"]
    assert transport.opened == 2


async def test_the_url_s_database_and_an_unreachable_server(redis_url):
    db5 = redis_url.rsplit("/", 1)[0] + "/5"
    transport = RoundTrips.for_url(db5)
    plain = redis.Redis.from_url(db5)
    try:
        await transport.execute([("SET", "rt:db", "five")])
        assert plain.get("rt:db") == b"five"
    finally:
        plain.delete("rt:db")
        plain.close()
        transport.close()
    nowhere = RoundTrips("127.0.0.1", 1, connect_timeout=2.0)
    with pytest.raises(RedisConnectionError, match="127.0.0.1:1"):
        await nowhere.execute([("PING",)])


async def test_a_server_still_loading_its_data_raises_what_callers_retry():
    """After a restart Redis answers ``-LOADING`` until its AOF is read: redis-py raises
    that (``BusyLoadingError``, a ``ConnectionError``), so must this. A scripted peer
    plays the loading server (a real one loads a small AOF faster than a test can ask)."""
    async def loading(reader, writer):
        first = True
        while data := await reader.read(65536):
            for _ in range(data.count(b"*")):  # one answer per command
                writer.write(b"+OK\r\n" if first else
                             b"-LOADING Redis is loading the dataset in memory\r\n")
                first = False
            await writer.drain()

    server = await asyncio.start_server(loading, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = RoundTrips("127.0.0.1", port)
    try:
        with pytest.raises(BusyLoadingError) as err:
            await transport.execute([("EVALSHA", "0" * 40, 0), ("HGETALL", "u")])
        assert isinstance(err.value, RedisConnectionError)  # what Scorer retries
    finally:
        transport.close()
        server.close()
        await server.wait_closed()
