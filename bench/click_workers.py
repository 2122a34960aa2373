"""Click path with 1, 2 and 4 worker processes on 8 partitions: events/s and exactness.

For each worker count, on a fresh embedded broker and Redis: start the workers
(``python -m headwater worker``, each on its own metrics port), wait until the consumer
group has settled (every partition assigned, every worker holding some), produce the
MovieLens events in envelopes, and time the first → last new row on ``train-batches``.
With ``--kill`` each count runs a second time with one worker killed with -9 once a
third of the events has its row (with one worker it is started again; with more, the
others take its partitions after the session timeout).

Exactness, per run: every user's and item's all-time impressions and clicks in Redis
against a direct count over the events (entities counted short / twice), and events
without a row on ``train-batches``. Runs alternate between the worker counts.

Run: ``.venv/bin/python bench/click_workers.py --events 40000 --repeat 2 --kill``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kafka import KafkaProducer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.click_path import RowWatcher  # noqa: E402
from core.health import read_all_sync  # noqa: E402
from core.redis_client import connect  # noqa: E402
from core.settings import Settings  # noqa: E402
from features.movielens import click_events, load_movielens  # noqa: E402
from features.store import SyncOnlineStore  # noqa: E402
from headwater.servers import free_port, start_broker, start_redis, stop_pid  # noqa: E402
from streams.replay import partition_of  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402
from tests.stackutil import Service  # noqa: E402

PARTITIONS = 8


def produce(kafka: str, topic: str, events: list[dict], envelope: int) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka, linger_ms=20, batch_size=1 << 20,
                             max_request_size=8 << 20)
    parts = partition_of([e["user_id"] for e in events], PARTITIONS)
    buffers: dict[int, list] = collections.defaultdict(list)
    for ev, p in zip(events, parts, strict=True):
        buffers[int(p)].append(ev)
        if len(buffers[int(p)]) >= envelope:
            producer.send(topic, json.dumps(buffers.pop(int(p))).encode(), partition=int(p))
    for p, buf in buffers.items():
        producer.send(topic, json.dumps(buf).encode(), partition=p)
    producer.flush()
    producer.close()


def exactness(url: str, events: list[dict]) -> dict:
    expected: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for ev in events:
        for entity in (f"item:{ev['item_id']}", f"user:{ev['user_id']}"):
            expected[entity][0] += 1
            expected[entity][1] += ev["label"]
    store = SyncOnlineStore.from_url(url, partitions=PARTITIONS)
    short = twice = 0
    try:
        for entity, (n, c) in expected.items():
            doc = store.entity_features(entity)
            got = (int(doc["impressions_total"]), int(doc["clicks_total"]))
            short += got[0] < n or got[1] < c
            twice += got[0] > n or got[1] > c
    finally:
        store.close()
    return {"entities": len(expected), "entities_short": short, "entities_twice": twice}


def settled(url: str, workers: int) -> bool:
    client = connect(url)
    try:
        docs = [d for d in read_all_sync(client) if d.get("service") == "worker"]
    finally:
        client.close()
    held = [sum(len(v) for k, v in (d.get("assigned") or {}).items() if k.endswith("clicks"))
            for d in docs]
    return len(held) == workers and all(held) and sum(held) == PARTITIONS


def run(workers: int, kill: bool, events: list[dict], envelope: int, work: Path) -> dict:
    tag = f"w{workers}{'k' if kill else ''}-{int(time.time() * 1000) % 100000}"
    broker = start_broker(log_path=work / f"broker-{tag}.log")
    rserver = start_redis(log_path=work / f"redis-{tag}.log")
    kafka, url = f"127.0.0.1:{broker.port}", rserver.extra["url"]
    prefix = f"{tag}-"
    settings = Settings(topic_prefix=prefix, partitions=PARTITIONS)
    ensure_topics(settings, kafka)
    env = dict(os.environ, HEADWATER_KAFKA=kafka, HEADWATER_REDIS=url, HEADWATER_TOPIC_PREFIX=prefix,
               HEADWATER_PARTITIONS=str(PARTITIONS), HEADWATER_CONTENT_ENCODER="hashing",
               HEADWATER_LOG_LEVEL="WARNING", HEADWATER_STATE_DIR=str(work / f"state-{tag}"))
    procs: list[Service] = []

    def start() -> Service:
        svc = Service("worker", dict(env, HEADWATER_WORKER_PORT=str(free_port())), work / "logs")
        procs.append(svc)
        return svc

    watcher = None
    try:
        for _ in range(workers):
            start()
        deadline = time.monotonic() + 180
        while not settled(url, workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} workers did not settle on {PARTITIONS} partitions")
            time.sleep(0.5)
        watcher = RowWatcher(kafka, settings.topics["train-batches"])
        t0 = time.time()
        produce(kafka, settings.topics["clicks"], events, envelope)
        produced_s = time.time() - t0
        killed_at = None
        deadline = time.monotonic() + 900
        while len(watcher.ids) < len(events):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(watcher.ids)} of {len(events)} rows arrived")
            if kill and killed_at is None and len(watcher.ids) >= len(events) // 3:
                procs[0].kill9()
                killed_at = len(watcher.ids)
                if workers == 1:
                    start()
            time.sleep(0.05)
        watcher.stop()
        seconds = watcher.last_new_t - watcher.first_t
        exact = exactness(url, events)
        missing = len({e["event_id"] for e in events} - watcher.ids)
        return {"workers": workers, "kill": kill, "events": len(events),
                "events_per_s": len(events) / seconds, "seconds": seconds,
                "produce_s": produced_s, "rows_sent": watcher.count, "killed_at_rows": killed_at,
                "events_without_row": missing, **exact, "load": os.getloadavg()[0]}
    finally:
        if watcher is not None:
            watcher.stop()
        for svc in procs:
            stop_pid(svc.proc.pid, proc=svc.proc)
        rserver.stop()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=40000)
    ap.add_argument("--envelope", type=int, default=200)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--kill", action="store_true", help="also run each count with a kill -9")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    ml = load_movielens()
    events = click_events(ml, 0, min(args.events, len(ml)))
    configs = [(w, k) for w in counts for k in ((False, True) if args.kill else (False,))]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            order = configs if r % 2 == 0 else configs[::-1]  # alternate the order
            for workers, kill in order:
                res = run(workers, kill, events, args.envelope, Path(tmp))
                results.append(res)
                print(json.dumps(res), flush=True)
    print(f"\n{len(events)} MovieLens events, envelopes of {args.envelope}, {PARTITIONS} partitions; "
          f"median of {args.repeat} (load average at each run's end: "
          f"{min(r['load'] for r in results):.1f}–{max(r['load'] for r in results):.1f})\n")
    print("| workers | kill -9 | events/s (median) | runs | entities short / twice | events without a row |")
    print("|---:|---|---:|---|---|---:|")
    for workers, kill in configs:
        rs = [r for r in results if r["workers"] == workers and r["kill"] == kill]
        med = statistics.median(r["events_per_s"] for r in rs)
        runs = " / ".join(f"{r['events_per_s']:,.0f}" for r in rs)
        short = sum(r["entities_short"] for r in rs)
        twice = sum(r["entities_twice"] for r in rs)
        print(f"| {workers} | {'one worker' if kill else '—'} | {med:,.0f} | {runs} | "
              f"{short} / {twice} of {rs[0]['entities']} | {sum(r['events_without_row'] for r in rs)} |")


if __name__ == "__main__":
    main()
