"""A/B of the online store's ``apply_batch`` between two checkouts, interleaved in one run.

Point-in-time history (docs/point-in-time.md) costs Redis and numpy work; this measures
it against a baseline checkout (e.g. the main branch) on the same MovieLens events, in
alternating child processes (same machine load), for two schedules:

* ``together``: the partitions' batches interleaved in event time (partitions advance
  together, as in a running worker);
* ``apart``: each partition's whole stream before the next one's (partitions months
  apart in event time: every other-shard read is out of order, the worst case).

Reported per side: events/s (wall), client CPU µs/event (``process_time``) and Redis
server µs/event (``INFO commandstats``), median of ``--repeat`` runs, and new/base ratios.

    .venv/bin/python bench/store_ab.py --base /tmp/main-checkout --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import numpy as np, redis
sys.path.insert(0, sys.argv[1])
from features.movielens import load_movielens
from features.rows import RowBuilder
from features.store import SyncOnlineStore
from headwater.servers import start_redis

events, batch, parts, schedule = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ml = load_movielens()
c = ml.clicks
n = min(events, len(c["ts"]))
part = np.asarray([hash(int(u)) % parts for u in c["user_id"][:n]])
chunks = []
for p in range(parts):
    idx = np.flatnonzero(part == p)
    for s in range(0, len(idx), batch):
        sel = idx[s : s + batch]
        cols = {k: v[sel] for k, v in c.items() if k != "rating"}
        cols["offset"] = np.arange(s, s + len(sel))
        cols["sub"] = np.zeros(len(sel), np.int32)
        cols["user"] = [ml.users[u] for u in cols["user_id"]]
        chunks.append((float(cols["ts"][0]), p, cols))
if schedule == "together":
    chunks.sort(key=lambda x: x[0])
server = start_redis()
url = server.extra["url"]
client = redis.Redis.from_url(url)
try:
    store = SyncOnlineStore.from_url(url, partitions=parts)
    items = {i: {"genres": a["genres"], "year": a["year"]} for i, a in ml.items.items()}
    store.put_item_attributes(items, ts=0)
    store.get_online_features({"item_id": list(items)}, ["item_attrs"], now=0.0)
    client.config_resetstat()
    wall = cpu = 0.0
    for _, p, cols in chunks:
        t0, c0 = time.perf_counter(), time.process_time()
        store.apply_batch("clicks", p, cols)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
    usec = sum(v.get("usec", 0) for v in client.info("commandstats").values())
    print(json.dumps({"events": n, "wall": wall, "cpu": cpu, "server_usec": usec}))
finally:
    client.close()
    server.stop()
"""


def run(repo: str, events: int, batch: int, parts: int, schedule: str) -> dict:
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, repo, str(events), str(batch), str(parts), schedule],
        capture_output=True, text=True, env=env, check=True, cwd=repo,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="baseline checkout (e.g. a clone of main)")
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    load0 = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; load average at start {load0[0]:.2f}")
    print("| schedule | side | events/s (wall) | client CPU µs/event | Redis µs/event |")
    print("|---|---|---:|---:|---:|")
    for schedule in ("together", "apart"):
        res: dict[str, list[dict]] = {"base": [], "new": []}
        for _ in range(args.repeat):
            for side, repo in (("base", args.base), ("new", str(REPO))):
                res[side].append(run(repo, args.events, args.batch, args.partitions, schedule))
        med = {}
        for side, rs in res.items():
            n = rs[0]["events"]
            med[side] = (
                statistics.median(n / r["wall"] for r in rs),
                statistics.median(r["cpu"] / n * 1e6 for r in rs),
                statistics.median(r["server_usec"] / n for r in rs),
            )
            print(f"| {schedule} | {side} | {med[side][0]:,.0f} | {med[side][1]:.1f} | "
                  f"{med[side][2]:.1f} |")
        b, w = med["base"], med["new"]
        print(f"| {schedule} | new/base | {w[0] / b[0]:.2f} | {w[1] / b[1]:.2f} | "
              f"{w[2] / b[2]:.2f} |")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
