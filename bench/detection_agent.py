"""The worker's audit agent in-process: ``streams.audit_path.AuditHandler`` with its durable
state, baselines and alerts in a real Redis, on real audit logs, per CPU-second.

What ``headwater worker`` runs per batch, without the broker and Faust (``bench/detection_e2e.py``
measures those too): split the messages, feed each host's engine, write the batch's
baselines, alerts and every touched host's engine state to Redis (fenced). The dev corpus
(``../shared/datasets/audit``) and the recorded benign days (``bench/benign_audit/data``,
the first ``--limit`` lines of each) are cut into messages of ``--lines`` lines, one host per
log, interleaved, spread over 4 partitions by host and handed over ``--batch`` messages at
a time per partition. Prints records per CPU-second of this process (all threads) and the
alert updates produced (they must not change with a speed change).

Baseline in the same run: ``--repo`` imports the product from another checkout (e.g. a clone
at the commit before a change); run the two alternately::

    .venv/bin/python bench/detection_agent.py --repo /path/to/baseline-clone
    .venv/bin/python bench/detection_agent.py
"""

from __future__ import annotations

import argparse
import asyncio
import lzma
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_logs(limit: int) -> list[tuple[str, list[bytes]]]:
    shared = Path(os.environ.get("HEADWATER_DATA_DIR", REPO.parent / "shared" / "datasets"))
    logs = [(p.stem[:5], p.read_bytes().splitlines()) for p in sorted((shared / "audit").glob("*.log"))]
    for p in sorted((REPO / "bench" / "benign_audit" / "data").glob("*.log.xz")):
        logs.append((p.name.split(".")[0], lzma.decompress(p.read_bytes()).splitlines()[:limit]))
    return logs


def partitions(logs, lines: int, n: int = 4) -> dict[int, list[tuple[int, bytes, bytes]]]:
    """Messages (offset, host, value) per partition, the logs interleaved message by message."""
    streams = [[(name, ls[i:i + lines]) for i in range(0, len(ls), lines)] for name, ls in logs]
    parts: dict[int, list] = {p: [] for p in range(n)}
    for i in range(max(map(len, streams))):
        for s in streams:
            if i < len(s):
                host, chunk = s[i]
                p = parts[zlib.crc32(host.encode()) % n]
                p.append((len(p), host.encode(), b"\n".join(chunk)))
    return parts


async def run(url: str, parts, batch: int) -> tuple[float, int]:
    import redis.asyncio as aredis

    from core.settings import Settings
    from detection.alert_store import save_alerts
    from detection.baseline_store import BaselineStore
    from detection.state_store import DetectionStateStore
    from streams.audit_path import AuditHandler, audit_engine_config
    from streams.metrics import WorkerMetrics

    client = aredis.Redis.from_url(url)
    await client.flushdb()
    settings = Settings()
    topics = settings.topics
    handler = AuditHandler(topics, WorkerMetrics(), alert_sink=lambda a: save_alerts(client, a),
                           executor=ThreadPoolExecutor(1), config=audit_engine_config(settings),
                           baseline_store=BaselineStore(client, settings.audit_baseline_ttl),
                           state_store=DetectionStateStore(client))
    updates = 0
    cpu = time.process_time()
    for start in range(0, max(map(len, parts.values())), batch):
        for p, msgs in parts.items():
            if msgs[start:start + batch]:
                out = await handler(topics["audit"], p, msgs[start:start + batch])
                updates += sum(1 for t, *_ in out if t == topics["alerts"])
    cpu = time.process_time() - cpu
    await client.aclose()
    return cpu, updates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose product code runs")
    ap.add_argument("--lines", type=int, default=100, help="audit lines per message")
    ap.add_argument("--batch", type=int, default=50, help="messages per partition batch")
    ap.add_argument("--limit", type=int, default=60_000, help="lines of each benign recording")
    args = ap.parse_args(argv)
    logs = load_logs(args.limit)
    parts = partitions(logs, args.lines)
    sys.path.insert(0, str(args.repo.resolve()))
    from headwater.servers import start_redis

    rds = start_redis()
    try:
        cpu, updates = asyncio.run(run(rds.extra["url"], parts, args.batch))
    finally:
        rds.stop()
    total = sum(len(ls) for _, ls in logs)
    print(f"{args.repo.resolve().name}: {total:,} records ({len(logs)} hosts), {updates} alert "
          f"updates, {cpu:.2f} CPU-s, {total / cpu:,.0f} records per CPU-second; load average "
          f"{os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
