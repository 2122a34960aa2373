"""The click handler alone (decode → dedup → counters in Redis → rows → Arrow), in process.

``bench/click_path.py`` measures the whole worker through the broker, which on a shared
machine mostly measures the machine; this drives the product's ``ClickHandler`` directly
with pre-built MovieLens messages against a real redis-server, and reports wall and CPU
time per event. ``--ab BASE_CHECKOUT`` runs it alternately on another checkout (its
own code, in a child process) and on this one, ``--rounds`` times each, on one Redis.

Run: ``.venv/bin/python bench/click_handler.py --ab ../main --rounds 3``
(``--gc-young 20000``: the worker's heap and garbage-collector settings, as in ``headwater worker``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_once(redis_url: str, events: int, envelope: int, partitions: int,
             batch_messages: int = 10, gc_young: int | None = None) -> dict:
    """Process ``events`` MovieLens clicks in envelopes through the handler (this tree's code).

    With ``gc_young`` the process first imports the worker (``streams.worker``: its heap)
    and, where the tree has it, settles the garbage collector as ``headwater worker``
    does (``core.heap.settle(gc_young)``).
    """
    sys.path.insert(0, str(Path.cwd()))
    try:  # the compiled replay, loaded before the timing (and the heap's freeze) as the
        from features.asof import warm  # worker does at start
    except ImportError:  # a checkout from before session 12
        pass
    else:
        warm()
    if gc_young is not None:
        import streams.worker  # noqa: F401 - the worker's heap
        try:
            from core.heap import settle
        except ImportError:  # a checkout from before session 8: the collector as shipped
            pass
        else:
            settle(gc_young)
    import redis
    import redis.asyncio as aioredis

    from core.settings import Settings
    from features.movielens import click_events, load_movielens
    from streams import click_path
    from streams.metrics import WorkerMetrics
    try:
        from streams.topics import partition_of
    except ImportError:  # a checkout from before issue 20
        from streams.replay import partition_of
    # CPU spent packing Redis commands (redis-py), to tell its share from the rest
    from redis.asyncio.connection import AbstractConnection

    from streams.worker import WorkerState

    packing = [0.0]
    pack_commands = AbstractConnection.pack_commands

    def timed_pack(self, commands):
        t = time.process_time()
        try:
            return pack_commands(self, commands)
        finally:
            packing[0] += time.process_time() - t

    AbstractConnection.pack_commands = timed_pack
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(partitions=partitions, content_encoder="hashing")
    evs = click_events(load_movielens(), 0, events)
    parts = partition_of([e["user_id"] for e in evs], partitions)
    batches: dict[int, list] = {p: [] for p in range(partitions)}
    for ev, p in zip(evs, parts, strict=True):
        batches[int(p)].append(ev)

    async def go() -> dict:
        try:  # the client the worker builds (core.redis_client), where the checkout has it
            from core.redis_client import connect_async
            client = connect_async(redis_url)
        except ImportError:
            client = aioredis.Redis.from_url(redis_url)
        metrics = WorkerMetrics()
        state = WorkerState(metrics)
        if hasattr(click_path, "click_handler"):
            handler = click_path.click_handler(settings, client, metrics, state, "127.0.0.1:9")
        else:
            handler = click_path.ClickHandler(settings, client, metrics, state, "127.0.0.1:9")
        topic = settings.topics["clicks"]
        wall, cpu = time.perf_counter(), time.process_time()
        rows = 0
        for p, evs_p in batches.items():
            offset = 0
            for start in range(0, len(evs_p), envelope * batch_messages):
                chunk = evs_p[start:start + envelope * batch_messages]
                messages = []
                for k in range(0, len(chunk), envelope):
                    messages.append((offset, None, json.dumps(chunk[k:k + envelope]).encode()))
                    offset += 1
                out = await handler(topic, p, messages)
                rows += sum(1 for o in out if o[0] == settings.topics["train-batches"])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        await client.aclose()
        return {"events": len(evs), "wall_s": wall, "cpu_s": cpu, "messages_out": rows,
                "events_per_s": len(evs) / wall, "cpu_us_per_event": 1e6 * cpu / len(evs),
                "packing_cpu_us_per_event": 1e6 * packing[0] / len(evs)}

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--envelope", type=int, default=200)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--batch-messages", type=int, default=10, help="messages per handler call")
    ap.add_argument("--redis", help="a Redis URL (default: start one)")
    ap.add_argument("--ab", help="another checkout to compare with, alternately")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gc-young", type=int, help="import the worker and settle its garbage "
                    "collector as headwater worker does (HEADWATER_WORKER_GC_YOUNG)")
    ap.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.once:
        print(json.dumps(run_once(args.redis, args.events, args.envelope, args.partitions,
                                  args.batch_messages, args.gc_young)))
        return
    sys.path.insert(0, str(REPO))
    from headwater.servers import start_redis

    server = None
    url = args.redis
    if url is None:
        server = start_redis(appendfsync="no")
        url = server.extra["url"]
    sides = ([("base", Path(args.ab).resolve())] if args.ab else []) + [("this", REPO)]
    results: dict[str, list[dict]] = {name: [] for name, _ in sides}
    try:
        for r in range(args.rounds):
            for name, tree in sides:
                load = os.getloadavg()[0]
                out = subprocess.run(
                    [sys.executable, str(REPO / "bench" / "click_handler.py"), "--once", "--redis", url,
                     "--events", str(args.events), "--envelope", str(args.envelope),
                     "--partitions", str(args.partitions), "--batch-messages", str(args.batch_messages),
                     *(["--gc-young", str(args.gc_young)] if args.gc_young is not None else [])],
                    cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                    text=True, check=True, timeout=900)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                res["load"] = load
                results[name].append(res)
                print(f"round {r + 1} {name:4s} ({tree}): {res['events_per_s']:,.0f} events/s, "
                      f"{res['cpu_us_per_event']:.1f} µs CPU/event (packing Redis commands "
                      f"{res['packing_cpu_us_per_event']:.1f}), load {load:.1f}", flush=True)
    finally:
        if server is not None:
            server.stop()
    print("\n| checkout | events/s (median) | CPU µs/event (median) | of it packing Redis commands |"
          "\n|---|---:|---:|---:|")
    for name, rs in results.items():
        eps = sorted(x["events_per_s"] for x in rs)[len(rs) // 2]
        cpu = sorted(x["cpu_us_per_event"] for x in rs)[len(rs) // 2]
        pack = sorted(x["packing_cpu_us_per_event"] for x in rs)[len(rs) // 2]
        print(f"| {name} | {eps:,.0f} | {cpu:.1f} | {pack:.1f} |")


if __name__ == "__main__":
    main()
