"""The joiner's 1 s clock tick under the soak's scoring load, on its own event loop.

The 10-minute soak (1,000 clicks/s + 10 scoring requests/s of 20 candidates for one
user) logged the worker's ``join_tick`` timer as overlapping (runtime 1.0-1.9 s). This
bench asks how much of that is the joiner's own work: one ``JoinHandler`` against a real
Redis, a simulated clock, and per simulated second the soak's impressions (10 answers of
20 candidates, one user, so one partition) as one batch, then one ``tick()``. No
actions: windows close by the watermark (600 s by default), so after the first window
every tick closes about 200 impressions into label-0 rows. Prints the wall time of the
batches and of the ticks (p50 / p99 / max), measured on this process's own loop (the
worker shares its loop with the click path; the joiner's work is what this isolates).

    .venv/bin/python bench/join_tick.py --seconds 900

``--repo DIR`` imports the product from another checkout (a baseline, same run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--seconds", type=int, default=900, help="simulated seconds (one tick each)")
ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
ap.add_argument("--redis", default=None, help="a Redis URL (default: start one)")
ARGS = ap.parse_args()
sys.path.insert(0, str(ARGS.repo.resolve()))

from core.settings import Settings  # noqa: E402

T0 = time.time() - 10 * 86400
PER_SECOND, CANDIDATES = 10, 20


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def run(url: str) -> dict[str, list[float]]:
    import redis.asyncio as aioredis

    from features.defaults import row_builder
    from streams.join_path import JoinHandler
    from streams.metrics import WorkerMetrics

    state = Path(tempfile.mkdtemp(prefix="bench-join-tick-"))
    settings = Settings(content_encoder="hashing", partitions=4, state_dir=state,
                        model_store=state / "models")
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    clock = Clock()
    h = JoinHandler(settings, client, WorkerMetrics(), builder=row_builder(settings), clock=clock)
    sent = []

    async def send(outputs):
        sent.extend(outputs)
    h.send = send
    h.on_assigned(range(4))
    schema = h.schema
    f, d = len(schema.categorical), len(schema.dense)
    rng = np.random.default_rng(0)
    cat = [[int(x) for x in rng.integers(1, 2**62, f)] for _ in range(CANDIDATES)]
    dense = [[float(x) for x in rng.random(d)] for _ in range(CANDIDATES)]
    out: dict[str, list[float]] = {"batch": [], "tick": []}
    offset = 0
    for s in range(ARGS.seconds):
        clock.now = T0 + s
        msgs = []
        for k in range(PER_SECOND):
            msgs.append((offset, b"load", json.dumps({
                "request_id": f"r{s}-{k}", "ts": clock.now + k / PER_SECOND, "user_id": "load-user",
                "model_version": "1", "schema_hash": schema.hash,
                "candidates": [{"item_id": f"i{j}", "position": j, "score": 0.5}
                               for j in range(CANDIDATES)],
                "categorical": cat, "dense": dense}).encode()))
            offset += 1
        t = time.perf_counter()
        await h(h.imp_topic, 0, msgs)
        out["batch"].append(time.perf_counter() - t)
        clock.now = T0 + s + 0.99
        t = time.perf_counter()
        await h.tick()
        out["tick"].append(time.perf_counter() - t)
    rows = sum(1 for o in sent if o[0] == settings.topics["train-batches"])
    print(f"{ARGS.repo}: {ARGS.seconds} ticks, {rows} row messages sent", flush=True)
    await client.aclose()
    return out


def main() -> None:
    server = None
    url = ARGS.redis
    if url is None:
        from headwater.servers import start_redis

        server = start_redis()
        url = server.extra["url"]
    try:
        res = asyncio.run(run(url))
    finally:
        if server is not None:
            server.stop()
    for name, xs in res.items():
        a = np.asarray(xs) * 1000
        steady = a[len(a) * 2 // 3:]  # windows closing every tick (after the first 600 s)
        print(f"{name}: p50 {np.percentile(a, 50):.1f} ms, p99 {np.percentile(a, 99):.1f} ms, "
              f"max {a.max():.1f} ms; last third p50 {np.percentile(steady, 50):.1f} ms, "
              f"p99 {np.percentile(steady, 99):.1f} ms")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
