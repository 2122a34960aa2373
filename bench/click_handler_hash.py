"""The click handler's outputs and Redis state for fixed batches, hashed: an exactness check.

``bench/click_replay_hash.py`` goes through the broker, where takes close on timing and
the other partitions' counters are read as far as they got, so two runs of the same code
differ in their cross-partition features. This drives ``ClickHandler`` in process on
fixed batches (partition by partition, in a fixed interleaving) against a fresh Redis, so
two runs of the same code give the same bytes: every output message (the Arrow rows,
dead letters without their wall-clock ``ts``) in order, and every Redis key the click path wrote (the shards' random
writer tokens left out). Run it from two checkouts and compare the printed hashes:

``PYTHONPATH=. .venv/bin/python bench/click_handler_hash.py --redis URL --events 30000 --envelope 200``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(redis_url: str, events: int, envelope: int, batch_messages: int, partitions: int) -> dict:
    sys.path.insert(0, str(Path.cwd()))
    import redis

    from core.redis_client import connect_async
    from core.settings import Settings
    from features.movielens import click_events, load_movielens
    from streams import click_path
    from streams.metrics import WorkerMetrics
    from streams.topics import partition_of
    from streams.worker import WorkerState

    sync = redis.Redis.from_url(redis_url)
    sync.flushdb()
    settings = Settings(partitions=partitions, content_encoder="hashing")
    evs = click_events(load_movielens(), 0, events)
    evs += [dict(e, event_id=e["event_id"] + "#dup") for e in evs[:50]]  # same ids again:
    evs += evs[100:150]  # duplicate events (dead letters), and ids seen again
    parts = partition_of([e["user_id"] for e in evs], partitions)
    per: dict[int, list] = {p: [] for p in range(partitions)}
    for ev, p in zip(evs, parts, strict=True):
        per[int(p)].append(ev)
    chunks = []
    step = envelope * batch_messages
    for p, es in per.items():
        for k, start in enumerate(range(0, len(es), step)):
            chunks.append((k, p, es[start:start + step]))
    chunks.sort(key=lambda c: (c[0], c[1]))  # partitions interleaved, as takes hand them over

    async def go() -> dict:
        client = connect_async(redis_url)
        metrics = WorkerMetrics()
        handler = click_path.click_handler(settings, client, metrics, WorkerState(metrics), "127.0.0.1:9")
        topic = settings.topics["clicks"]
        offsets = {p: 0 for p in per}
        out_hash = hashlib.sha256()
        n_out = 0
        for _, p, chunk in chunks:
            messages = []
            for k in range(0, len(chunk), envelope):
                part = chunk[k:k + envelope]
                body = part[0] if envelope == 1 else part
                messages.append((offsets[p], str(p).encode(), json.dumps(body).encode()))
                offsets[p] += 1
            for t, key, value, part in await handler(topic, p, messages):
                if t == settings.topics["dead-letter"]:
                    value = json.dumps({**json.loads(value), "ts": None}).encode()  # when: not what
                out_hash.update(repr((t, key, part)).encode())
                out_hash.update(value)
                n_out += 1
        await client.aclose()
        return {"outputs": n_out, "outputs_sha": out_hash.hexdigest()[:16]}

    res = asyncio.run(go())
    state = hashlib.sha256()
    keys = sorted(sync.scan_iter(count=1000))
    kept = 0
    for key in keys:
        if key.endswith(b":writer"):
            continue
        kind = sync.type(key).decode()
        if kind == "hash":
            value = sorted(sync.hgetall(key).items())
        elif kind == "string":
            value = sync.get(key)
        elif kind == "zset":
            value = sync.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        state.update(repr((key, value)).encode())
        kept += 1
    sync.close()
    return {"events": len(evs), "envelope": envelope, **res, "redis_keys": kept,
            "redis_sha": state.hexdigest()[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", required=True)
    ap.add_argument("--events", type=int, default=30000)
    ap.add_argument("--envelope", type=int, default=200)
    ap.add_argument("--batch-messages", type=int, default=20)
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()
    print(json.dumps(run(args.redis, args.events, args.envelope, args.batch_messages, args.partitions)))


if __name__ == "__main__":
    main()
