"""``headwater replay movielens --as impressions``: ratings as impressions and clicks.

Each labelled rating (the protocol's set: rating ≥ 4 or ≤ 2, docs/protocol.md) becomes
one impression of its item to its user, and a rating ≥ 4 also a click (an ``actions``
event quoting the impression's request id) 1 to 5 seconds later, so the whole joined
path runs on real data:

- **through serving** when it answers at ``http`` (``GET /readyz``): ratings go to
  ``POST /v1/score`` in small batches (``batch``, 20), serving logs the impressions
  itself (its clock is their time) and the clicks are stamped from the moment the answer
  came back (so a slow answer makes its clicks later: keep the attribution window well
  above serving's latency);
- **logged directly** otherwise: this process scores each rating with serving's own
  :class:`serving.scoring.Scorer` (newest published model, else the baseline) at the
  rating's own time and logs it through the same :class:`serving.impressions.ImpressionLog`.

Items are replayed first, as in the labelled replay.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import msgspec
import numpy as np

from core.settings import Settings
from features.movielens import load_movielens
from streams.producer import make_producer
from streams.replay import progress_bar, replay_items, resolve_path
from streams.topics import partition_of


def serving_ready(http: str | None) -> bool:
    if not http:
        return False
    try:
        with urllib.request.urlopen(f"{http}/readyz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class _Actions:
    """Click events to ``actions``, one envelope per partition per flush."""

    def __init__(self, settings: Settings, producer) -> None:
        self.settings, self.producer = settings, producer
        self.enc = msgspec.json.Encoder()
        self.buf: list[dict] = []
        self.sent = 0

    def add(self, event: dict) -> None:
        self.buf.append(event)

    def flush(self) -> None:
        if not self.buf:
            return
        parts = partition_of([e["user_id"] for e in self.buf], self.settings.partitions)
        for p in np.unique(parts):
            chunk = [e for e, q in zip(self.buf, parts, strict=True) if q == p]
            self.producer.send(self.settings.topics["actions"], value=self.enc.encode(chunk),
                               partition=int(p))
        self.sent += len(self.buf)
        self.buf = []


def replay_impressions(settings: Settings, bootstrap: str, redis_url: str, path: Path | None = None,
                       limit: int = 0, batch: int = 20, progress: bool = True,
                       wait_items: float = 120.0, http: str | None = None, seed: int = 0) -> dict:
    ml = load_movielens(resolve_path(path, settings))
    producer = make_producer(bootstrap)
    t0 = time.perf_counter()
    n_items, coded = replay_items(settings, producer, ml, redis_url, wait_items)
    c = ml.clicks
    total = len(ml) if not limit else min(limit, len(ml))
    rng = np.random.default_rng(seed)
    delays = rng.uniform(1.0, 5.0, total)
    actions = _Actions(settings, producer)
    through = serving_ready(http)
    t1 = time.perf_counter()
    with progress_bar(total, progress, "impressions") as bar:
        if through:
            _through_serving(http, ml, total, batch, delays, actions, bar)
        else:
            asyncio.run(_direct(settings, bootstrap, redis_url, ml, total, delays, actions, bar))
    actions.flush()
    producer.flush()
    producer.close()
    seconds = time.perf_counter() - t1
    return {"items": n_items, "items_coded": coded, "impressions": total, "clicks": actions.sent,
            "mode": "serving" if through else "direct", "seconds": time.perf_counter() - t0,
            "impressions_per_s": total / seconds if seconds else 0.0,
            "labels": int(np.asarray(c["label"][:total]).sum())}


def _through_serving(http: str, ml, total: int, batch: int, delays, actions: _Actions, bar) -> None:
    c = ml.clicks
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        reqs = [{"user_id": c["user_id"][k], "candidates": [c["item_id"][k]],
                 "user": ml.users.get(c["user_id"][k]) or None} for k in range(start, stop)]
        body = json.dumps({"requests": reqs}).encode()
        request = urllib.request.Request(f"{http}/v1/score", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            results = json.loads(resp.read())["results"]
        answered = time.time()
        for k, res in zip(range(start, stop), results, strict=True):
            if int(c["label"][k]) == 1:
                actions.add({"event_id": f"click-{c['event_id'][k]}", "ts": answered + float(delays[k]),
                             "user_id": c["user_id"][k], "item_id": c["item_id"][k],
                             "request_id": res["request_id"]})
        actions.flush()
        bar.update(stop - start)


async def _direct(settings: Settings, bootstrap: str, redis_url: str, ml, total: int, delays,
                  actions: _Actions, bar) -> None:
    import uuid

    import redis.asyncio as aioredis

    from serving.app import build_context
    from serving.impressions import ImpressionLog, impression_record, kafka_sender
    from serving.scoring import ScoreRequest

    client = aioredis.Redis.from_url(redis_url)
    ctx = build_context(settings, client)
    await ctx.holder.astart()
    served = ctx.holder.current or ctx.baseline
    log = ImpressionLog(kafka_sender(bootstrap, settings.topics["impressions"]), settings.partitions,
                        capacity=max(settings.impression_buffer, 1000))
    log.start()
    c = ml.clicks
    try:
        for k in range(total):
            ts = float(c["ts"][k])
            ctx.scorer.clock = lambda ts=ts: ts
            req = ScoreRequest(c["user_id"][k], [c["item_id"][k]], None,
                               ml.users.get(c["user_id"][k]) or None)
            scored = await ctx.scorer.score_rows(served, req)
            rid = uuid.uuid4().hex
            record = impression_record(rid, req.user_id, req.candidates, scored.scores,
                                       scored.categorical, scored.dense, ts, served.version,
                                       ctx.scorer.schema.hash)
            while not log.offer(record):  # a replay may wait; serving never does
                await asyncio.sleep(0.01)
            if int(c["label"][k]) == 1:
                actions.add({"event_id": f"click-{c['event_id'][k]}", "ts": ts + float(delays[k]),
                             "user_id": req.user_id, "item_id": req.candidates[0], "request_id": rid})
            if len(actions.buf) >= 500:
                actions.flush()
            bar.update(1)
    finally:
        await asyncio.to_thread(log.close, 60.0)
        ctx.holder.close()
        await client.aclose()
