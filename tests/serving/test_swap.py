"""Hot swap under concurrent load: no failed request, only good versions, versions only increase."""

from __future__ import annotations

import asyncio
import json

import numpy as np


async def test_hot_swap_under_concurrent_load(settings, seeded_redis, publish, store, make_app, h):
    publish(0, kind="deepfm")
    client, ctx = await make_app(settings, seeded_redis)
    good = {"000001"}
    stop = asyncio.Event()
    seen: list[list[str]] = []
    failures: list[tuple[int, str]] = []
    body = json.dumps(
        {"user_id": "u1", "candidates": [f"i{k}" for k in range(50)], "context": {"device": "tv"}}
    ).encode()

    async def worker() -> None:
        mine: list[str] = []
        seen.append(mine)
        while not stop.is_set():
            resp = await client.post("/v1/score", data=body)
            text = await resp.text()
            if resp.status != 200:
                failures.append((resp.status, text))
                continue
            doc = json.loads(text)
            assert len(doc["scores"]) == 50 and np.isfinite(doc["scores"]).all()
            mine.append(doc["model_version"])

    tasks = [asyncio.create_task(worker()) for _ in range(24)]
    await asyncio.sleep(0.2)
    for seed in range(1, 7):
        bad = seed == 3
        v = publish(seed, kind="deepfm", nan=bad)
        if seed == 5:
            h.tamper(store, v)
            bad = True
        if not bad:
            good.add(v)
        # The watcher's path: offer on the loader thread while requests keep flowing.
        await ctx.holder.submit(ctx.holder.offer, v)
        if not bad:
            await h.wait_for(lambda v=v: any(s and s[-1] == v for s in seen), timeout=20)
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)

    assert failures == []
    total = sum(len(s) for s in seen)
    assert total > 100
    versions = {v for s in seen for v in s}
    assert versions == good, versions ^ good  # every good version served, no bad one
    for s in seen:
        assert s == sorted(s), "a client saw an older version after a newer one"
    assert ctx.holder.current.version == max(good)
    text = await (await client.get("/metrics")).text()
    assert h.metric(text, "headwater_model_swaps_total") == len(good)
    assert h.metric(text, "headwater_score_requests_total", 'code="200"') == total


async def test_request_finishes_on_the_model_it_started_with(
    settings, seeded_redis, publish, make_app, h
):
    """Swapping while a request is between its feature read and its forward pass."""
    publish(0)
    client, ctx = await make_app(settings, seeded_redis)
    real_features = ctx.scorer.features
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow_features(req, now):
        got = await real_features(req, now)
        entered.set()
        await gate.wait()
        return got

    ctx.scorer.features = slow_features
    pending = asyncio.create_task(client.post("/v1/score", data=h.score_body()))
    await entered.wait()
    assert await ctx.holder.submit(ctx.holder.offer, publish(1)) is True
    gate.set()
    resp = await pending
    assert (await resp.json())["model_version"] == "000001"
    ctx.scorer.features = real_features
    resp = await client.post("/v1/score", data=h.score_body())
    assert (await resp.json())["model_version"] == "000002"
