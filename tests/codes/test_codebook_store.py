"""Shared codebooks in real Redis: one fitter (the lease), fenced publication, newest codes win."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import redis.asyncio as aioredis

from features.codebook_store import CodebookStore
from features.store import SyncOnlineStore


def _store(client, lease_seconds: float = 30.0) -> CodebookStore:
    return CodebookStore(client, "test", lease_seconds, lambda i: f"hw:codes:item:{i}")


def test_one_fitter_at_a_time_and_a_lapsed_lease_cannot_publish(redis_db):
    async def go():
        client = aioredis.Redis.from_url(redis_db)
        try:
            a, b = _store(client, lease_seconds=0.3), _store(client)
            token = await a.acquire()
            assert token and await b.acquire() is None  # the lease is held
            assert await a.publish(token, "000000-aaaa.identity", {"x": np.arange(3)})
            assert (await b.current())[0] == "000000-aaaa.identity"
            assert (await b.load("000000-aaaa.identity"))["x"].tolist() == [0, 1, 2]
            await asyncio.sleep(0.4)  # a's lease lapsed (a fitter that died frees it)
            other = await b.acquire()
            assert other is not None
            assert not await a.publish(token, "000001-bbbb.identity", {"x": np.arange(1)})
            assert (await b.current())[0] == "000000-aaaa.identity"
            await a.release(token)  # not a's any more: releasing does nothing
            assert await a.acquire() is None
            await b.release(other)
            assert await a.acquire() is not None
        finally:
            await client.aclose()

    asyncio.run(go())


def test_codes_of_an_older_generation_never_replace_newer_ones(redis_db):
    async def go():
        client = aioredis.Redis.from_url(redis_db)
        try:
            s = _store(client)
            new = {"7": {"rq": [1, 2], "vq": [3]}}
            old = {"7": {"rq": [9, 9], "vq": [9]}, "8": {"rq": [0, 0], "vq": [1]}}
            assert await s.write_codes(new, "000002-cccc.identity") == 1
            assert await s.write_codes(old, "000001-dddd.identity") == 1  # only item 8
            doc = await client.hgetall("hw:codes:item:7")
            assert json.loads(doc[b"codes"]) == {"rq": [1, 2], "vq": [3]}
            assert json.loads(doc[b"version"]) == "000002-cccc.identity"
            store = SyncOnlineStore.from_url(redis_db, partitions=1)  # rows and serving read them as ever
            assert store.get_item_codes_many(["7", "8"]) == [{"rq": [1, 2], "vq": [3]},
                                                             {"rq": [0, 0], "vq": [1]}]
            store.close()
        finally:
            await client.aclose()

    asyncio.run(go())
