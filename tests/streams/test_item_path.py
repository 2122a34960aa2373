"""The items path against real Redis: codes the moment content arrives, stable refresh."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from core.settings import Settings
from features.codes_service import CodeAssigner, CodesConfig
from features.store import SyncOnlineStore
from streams.item_path import ItemHandler, make_encoder
from streams.metrics import WorkerMetrics
from streams.worker import WorkerState


def item(i: int) -> dict:
    genres = ["Action", "Comedy", "Drama", "Horror"]
    return {"item_id": str(i), "ts": 880_000_000, "text": f"movie {i} about {genres[i % 4]}",
            "tags": [genres[i % 4]], "attributes": {"year": 1990 + i % 10}}


async def test_codes_on_arrival_and_refresh_keeps_them(redis_db):
    settings = Settings(content_encoder="hashing", partitions=2)
    client = aioredis.Redis.from_url(redis_db)
    metrics = WorkerMetrics()
    assigner = CodeAssigner(make_encoder("hashing"),
                            CodesConfig(levels=2, codebook_size=4, vq_k=3, min_fit_items=16))
    handler = ItemHandler(settings, client, metrics, WorkerState(metrics), assigner=assigner)
    first = [(k, None, json.dumps(item(k)).encode()) for k in range(20)]
    await handler("items", 0, first)
    late = [(20, None, json.dumps(item(99)).encode())]
    await handler("items", 0, late)  # a cold item arriving later gets codes at once
    store = SyncOnlineStore.from_url(redis_db, partitions=2)
    try:
        codes = store.get_item_codes_many(["0", "19", "99"])
        assert all(c is not None and len(c["rq"]) == 2 and len(c["vq"]) == 3 for c in codes)
        assert store.entity_features("item:99")["attributes"]["year"] == 1999
        # The first refresh re-fits on items that arrived after the first fit: few move.
        assert await handler.refresh() <= 21 // 4
        settled = store.get_item_codes_many([str(i) for i in range(20)])
        assert await handler.refresh() == 0  # unchanged catalogue: no code moves
        assert store.get_item_codes_many([str(i) for i in range(20)]) == settled
    finally:
        store.close()
        await client.aclose()
