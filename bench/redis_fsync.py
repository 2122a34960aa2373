"""The embedded Redis's AOF fsync policy: counter-apply throughput under each, same run.

Starts one redis-server per policy (``appendonly no`` as the baseline, then ``appendfsync``
``no``, ``everysec`` and ``always``, each with its own AOF directory), applies the same
MovieLens click batches with the online store's fenced Lua write, and reports events/s and
p50/p99 per batch, median of ``--repeat`` rounds (policies interleaved within a round).

Run: ``.venv/bin/python bench/redis_fsync.py`` (``--events``, ``--batch``, ``--repeat``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from features.movielens import load_movielens  # noqa: E402
from features.store import SyncOnlineStore  # noqa: E402
from headwater.servers import start_redis  # noqa: E402
from streams.topics import partition_of  # noqa: E402

POLICIES = ("no-aof", "no", "everysec", "always")


def batches(n_events: int, size: int, partitions: int) -> list[tuple[int, dict]]:
    ml = load_movielens()
    c = {k: v[:n_events] for k, v in ml.clicks.items()}
    parts = partition_of(c["user_id"], partitions)
    out = []
    offsets = dict.fromkeys(range(partitions), 0)
    for p in range(partitions):
        idx = np.flatnonzero(parts == p)
        for start in range(0, len(idx), size):
            sel = idx[start:start + size]
            n = len(sel)
            cols = {k: v[sel] for k, v in c.items() if k != "rating"}
            cols["offset"] = np.arange(offsets[p], offsets[p] + n, dtype=np.int64)
            cols["sub"] = np.zeros(n, np.int32)
            offsets[p] += n
            out.append((p, cols))
    return out


def run(policy: str, work: Path, plan: list[tuple[int, dict]], partitions: int) -> tuple[float, list[float]]:
    data = None if policy == "no-aof" else work / f"aof-{policy}-{time.monotonic_ns()}"
    server = start_redis(data_dir=data, appendfsync="everysec" if policy == "no-aof" else policy)
    store = SyncOnlineStore.from_url(server.extra["url"], partitions=partitions)
    try:
        times = []
        t0 = time.perf_counter()
        for p, cols in plan:
            t = time.perf_counter()
            store.apply_batch("clicks", p, cols)
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        n = sum(len(c["ts"]) for _, c in plan)
        return n / total, times
    finally:
        store.close()
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    plan = batches(args.events, args.batch, args.partitions)
    rates: dict[str, list[float]] = {p: [] for p in POLICIES}
    lat: dict[str, list[float]] = {p: [] for p in POLICIES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for policy in POLICIES:
                rate, times = run(policy, Path(tmp), plan, args.partitions)
                rates[policy].append(rate)
                lat[policy].extend(times)
    base = statistics.median(rates["no-aof"])
    print(f"{args.events} MovieLens events, batches of {args.batch}, {args.partitions} partitions, "
          f"median of {args.repeat} rounds")
    print("| policy | events/s | vs no AOF | p50 ms/batch | p99 ms/batch |")
    print("|---|---:|---:|---:|---:|")
    for policy in POLICIES:
        r = statistics.median(rates[policy])
        t = sorted(lat[policy])
        print(f"| {policy} | {r:,.0f} | {r / base:.2f} | {t[len(t) // 2] * 1000:.1f} | "
              f"{t[int(len(t) * 0.99) - 1] * 1000:.1f} |")


if __name__ == "__main__":
    main()
