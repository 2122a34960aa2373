"""Benchmark: online-store apply_batch + row building on MovieLens clicks vs plain HINCRBY.

Replays MovieLens-100K click events in time order, keyed by user into ``--partitions``
partitions (as the clicks topic is), in batches of ``--batch`` events per partition,
against a real redis-server (``HEADWATER_REDIS`` or a throwaway one started here).
Beside it, in the same run, the baseline: one pipelined round trip of plain ``HINCRBY``
(impressions and clicks) on the same entity keys: what counting costs with no decay,
no idempotency and no point-in-time features.

    .venv/bin/python bench/features_store.py [--events 30000] [--batch 1000] [--partitions 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from features.counters import as_columns, resolve_refs  # noqa: E402
from features.hashing import hash_tokens  # noqa: E402
from features.movielens import load_movielens  # noqa: E402
from features.rows import RowBuilder  # noqa: E402
from features.store import SyncOnlineStore  # noqa: E402


def _batches(ml, n_events: int, batch: int, partitions: int):
    c = ml.clicks
    n = min(n_events, len(ml))
    part = hash_tokens("user_id", c["user_id"][:n]) % partitions
    next_offset = [0] * partitions
    for p in range(partitions):
        idx = np.flatnonzero(part == p)
        for s in range(0, len(idx), batch):
            sel = idx[s : s + batch]
            cols = {k: v[sel] for k, v in c.items() if k != "rating"}
            cols["offset"] = np.arange(next_offset[p], next_offset[p] + len(sel))
            cols["sub"] = np.zeros(len(sel), np.int32)
            cols["user"] = [ml.users[u] for u in cols["user_id"]]
            next_offset[p] += len(sel)
            yield p, cols


def bench_redis():
    """``(url, server)``: ``HEADWATER_REDIS`` (server ``None``) or a throwaway redis-server
    started here (stop it when done)."""
    url = os.environ.get("HEADWATER_REDIS")
    if url:
        return url, None
    from headwater.servers import start_redis

    server = start_redis()
    return server.extra["url"], server


def _pct(values, q):
    return float(np.percentile(np.asarray(values), q)) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()

    url, server = bench_redis()
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        ml = load_movielens()
        store = SyncOnlineStore.from_url(url, partitions=args.partitions)
        items = {i: {"genres": a["genres"], "year": a["year"]} for i, a in ml.items.items()}
        store.put_item_attributes(items, ts=0)
        rows = RowBuilder()
        batches = list(_batches(ml, args.events, args.batch, args.partitions))
        n = sum(len(b["ts"]) for _, b in batches)

        apply_s, build_s, rt0, cmd0 = [], [], store.round_trips, store.commands
        # Warm the item-attribute cache and the scripts outside the timed loop, as a
        # long-running worker would be.
        store.get_online_features({"item_id": list(items)}, ["item_attrs"], now=0.0)
        rt0, cmd0 = store.round_trips, store.commands
        client.config_resetstat()
        t_all = time.perf_counter()
        for p, cols in batches:
            t0 = time.perf_counter()
            res = store.apply_batch("clicks", p, cols)
            t1 = time.perf_counter()
            rows.build(cols, res.features, res.item_attrs, res.codes)
            build_s.append(time.perf_counter() - t1)
            apply_s.append(t1 - t0)
        total = time.perf_counter() - t_all
        stats = client.info("commandstats")
        evalsha = stats.get("cmdstat_evalsha", {}).get("calls", 0)
        inner = sum(
            stats.get(f"cmdstat_{c}", {}).get("calls", 0)
            for c in ("hmget", "hset", "hget", "hkeys")
        )
        refs_per_event = (
            np.mean(
                [
                    len(resolve_refs(store.counters, as_columns(c), items).event)
                    for _, c in batches[:3]
                ]
            )
            / args.batch
        )

        # Baseline: one pipelined round trip of HINCRBY n / HINCRBY c per (event, entity).
        client.flushdb()
        base_s = []
        for p, cols in batches:
            refs = resolve_refs(store.counters, as_columns(cols), items)
            t0 = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            labels = cols["label"][refs.event]
            for k, lab in zip(refs.entity, labels, strict=True):
                key = store.shard_key(p, refs.entities[k])
                pipe.hincrby(key, "n", 1)
                pipe.hincrby(key, "c", int(lab))
            pipe.execute()
            base_s.append(time.perf_counter() - t0)
        base_cmds = 2 * refs_per_event

        lines = [
            "# Online store benchmark (features)",
            "",
            f"Command: `.venv/bin/python bench/features_store.py --events {args.events} "
            f"--batch {args.batch} --partitions {args.partitions}`",
            "",
            f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs shared with other work, redis-server {client.info()['redis_version']}, "
            f"redis-py {redis.__version__}. {n} MovieLens click events in {len(batches)} batches "
            f"(users hashed to {args.partitions} partitions), default counters "
            f"({', '.join(s.name for s in store.counters.specs)}; half-lives 1 h, 1 d): "
            f"{refs_per_event:.2f} entity updates per event.",
            "",
            "| path | events/s | p50 ms/batch | p99 ms/batch | Redis commands/event (client) | round trips/batch |",
            "|---|---:|---:|---:|---:|---:|",
            f"| apply_batch (numpy point-in-time, fenced Lua write, idempotent) | {n / sum(apply_s):,.0f} | "
            f"{_pct(apply_s, 50):.1f} | {_pct(apply_s, 99):.1f} | "
            f"{(store.commands - cmd0) / n:.4f} | {(store.round_trips - rt0) / len(batches):.2f} |",
            f"| apply_batch + RowBuilder.build | {n / total:,.0f} | "
            f"{_pct(np.add(apply_s, build_s), 50):.1f} | {_pct(np.add(apply_s, build_s), 99):.1f} | | |",
            f"| RowBuilder.build alone | {n / sum(build_s):,.0f} | {_pct(build_s, 50):.1f} | "
            f"{_pct(build_s, 99):.1f} | | |",
            f"| baseline: pipelined HINCRBY n, c per entity | {n / sum(base_s):,.0f} | "
            f"{_pct(base_s, 50):.1f} | {_pct(base_s, 99):.1f} | {base_cmds:.2f} | 1 |",
            "",
            f"Server side during the apply run: {evalsha / n:.4f} EVALSHA per event (per batch: "
            f"one read script per partition shard, one fenced apply script, guarded "
            f"user-attribute writes) and {inner / n:.2f} hash operations per event inside the "
            f"scripts (each entity read once per shard and written once per batch, not once "
            f"per event).",
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        out = Path(__file__).resolve().parent / "results" / "features.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text(text)
    finally:
        client.flushdb()
        client.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
