"""Benchmark: what keeping worker state in Redis costs per batch (issue 13, points 5–6).

Two parts, each against a real redis-server (``HEADWATER_REDIS`` or a throwaway one
started here) and each beside its baseline measured in the same run:

- **Clicks**: the duplicate-id window (``features.event_ids.EventIdWindow``, one script
  call per batch) on MovieLens click batches, against the store's own ``apply_batch`` of
  the same batches (what the click path already did per batch).
- **Audit**: the worker's ``AuditHandler`` fed the dev audit logs as the shipper sends
  them (``--lines`` lines per message, one message per handler call), with durable
  detection state (``DetectionStateStore``) and without it (the old in-memory engines).

    .venv/bin/python bench/state_cost.py [--events 30000] [--batch 1000] [--lines 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis  # noqa: E402

from bench.features_store import _batches, bench_redis  # noqa: E402
from core.settings import Settings, default_data_dir  # noqa: E402
from detection.baseline_store import BaselineStore  # noqa: E402
from detection.state_store import DetectionStateStore  # noqa: E402
from features.event_ids import EventIdWindow  # noqa: E402
from features.movielens import load_movielens  # noqa: E402
from features.store import OnlineStore  # noqa: E402
from streams.audit_path import AuditHandler  # noqa: E402
from streams.metrics import WorkerMetrics  # noqa: E402


async def clicks(url: str, events: int, batch: int, partitions: int) -> dict:
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    store = OnlineStore(client, partitions=partitions)
    window = EventIdWindow(client)
    batches = list(_batches(load_movielens(), events, batch, partitions))
    apply_s, window_s = [], []
    for p, cols in batches:
        ids = [str(e) for e in cols["event_id"]]
        t0 = time.perf_counter()
        await window.duplicates("clicks", p, ids, cols["offset"], cols["sub"])
        t1 = time.perf_counter()
        await store.apply_batch("clicks", p, cols)
        apply_s.append(time.perf_counter() - t1)
        window_s.append(t1 - t0)
    used = (await client.info("memory"))["used_memory"]
    await client.aclose()
    n = sum(len(c["ts"]) for _, c in batches)
    return {"batches": len(batches), "events": n, "apply": np.array(apply_s),
            "window": np.array(window_s), "memory": used}


async def audit(url: str, logs: list[Path], lines_per_message: int, durable: bool) -> dict:
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    settings = Settings()
    pool = ThreadPoolExecutor(1)
    handler = AuditHandler(settings.topics, WorkerMetrics(), executor=pool,
                           baseline_store=BaselineStore(client, 86400),
                           state_store=DetectionStateStore(client) if durable else None)
    seconds, messages, lines = 0.0, 0, 0
    for part, log in enumerate(logs):
        text = log.read_text(encoding="utf-8").splitlines(True)
        host = log.stem[:5].encode()
        offset = 0
        for s in range(0, len(text), lines_per_message):
            value = "".join(text[s:s + lines_per_message]).encode()
            t0 = time.perf_counter()
            await handler("audit", part, [(offset, host, value)])
            seconds += time.perf_counter() - t0
            offset += 1
            messages += 1
        lines += len(text)
    stored = sum([await client.memory_usage(k) or 0
                  async for k in client.scan_iter("hw:audit:state:*")])
    pool.shutdown()
    await client.aclose()
    return {"seconds": seconds, "messages": messages, "lines": lines, "stored": stored}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--lines", type=int, default=100, help="audit lines per message")
    ap.add_argument("--repeat", type=int, default=7, help="alternating audit runs of each kind")
    args = ap.parse_args()
    url, server = bench_redis()
    try:
        c = asyncio.run(clicks(url, args.events, args.batch, args.partitions))
        logs = sorted((default_data_dir() / "audit").glob("dev0*.log"))
        # Alternate the two audit runs and take each one's median, the machine being shared.
        runs = {False: [], True: []}
        for _ in range(args.repeat):
            for durable in (False, True):
                runs[durable].append(asyncio.run(audit(url, logs, args.lines, durable)))
        plain, kept = (sorted(runs[d], key=lambda r: r["seconds"])[args.repeat // 2]
                       for d in (False, True))
    finally:
        if server is not None:
            server.stop()
    ms = 1000.0
    print("# Cost of worker state kept in Redis (issue 13)\n")
    print(f"Command: `.venv/bin/python bench/state_cost.py --events {args.events} --batch {args.batch} "
          f"--partitions {args.partitions} --lines {args.lines} --repeat {args.repeat}`\n")
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs shared with "
          f"other work.\n")
    print(f"Clicks: {c['events']} MovieLens events in {c['batches']} batches of up to {args.batch}.\n")
    print("| per batch | p50 ms | p95 ms | total s |")
    print("|---|---|---|---|")
    for name, v in (("apply_batch (baseline)", c["apply"]), ("duplicate-id window", c["window"])):
        print(f"| {name} | {np.percentile(v, 50) * ms:.2f} | {np.percentile(v, 95) * ms:.2f} "
              f"| {v.sum():.2f} |")
    print(f"\nWindow / apply_batch (total): {c['window'].sum() / c['apply'].sum():.2f}. "
          f"Redis used_memory after both: {c['memory'] / 2**20:.1f} MiB.\n")
    print(f"Audit: {plain['lines']} lines of {len(logs)} dev logs in {plain['messages']} messages "
          f"of {args.lines} lines, one handler call each (median of {args.repeat} alternating runs).\n")
    print("| audit handler | total s | ms per message |")
    print("|---|---|---|")
    for name, r in (("engines in memory (baseline)", plain), ("durable detection state", kept)):
        print(f"| {name} | {r['seconds']:.2f} | {r['seconds'] / r['messages'] * ms:.2f} |")
    print(f"\nDurable / in memory: {kept['seconds'] / plain['seconds']:.2f}. "
          f"Detection state in Redis at the end: {kept['stored'] / 1024:.0f} KiB.")


if __name__ == "__main__":
    main()
