"""One replay through a real ``headwater worker``: a hash of its rows and of its counters.

For telling whether a change to the click path kept its output exact: run it from two
checkouts on the same input and compare the printed hashes. It starts a broker and a
Redis, produces MovieLens click events (single-event messages or envelopes, with the
time-shifted copies of ``bench/click_path.py``), runs one worker until every row is on
``train-batches``, then hashes

* ``rows``: every row of ``train-batches`` (every column, as Arrow holds it), sorted by
  (source partition, offset, sub), so how rows were split into messages does not count;
* ``counters``: every entity hash in Redis (field -> value) and every entity's history
  string, and the duplicate-id windows: the online state the click path leaves;
* ``offsets``: the next offset recorded per partition.

Left out on purpose: the replay cache (``pit:`` entries are keyed by the first offset of
each batch, so they depend on where takes happened to close), the shards' writer tokens
(random per write), heartbeats and other services' keys.

Run from a checkout: ``PYTHONPATH=. .venv/bin/python bench/click_replay_hash.py --events 20000 --envelope 1``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import redis
from kafka import KafkaConsumer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.click_path import PARTITIONS, payloads, produce_all, start_service  # noqa: E402
from core.settings import Settings  # noqa: E402
from features.movielens import click_events, load_movielens  # noqa: E402
from headwater.servers import free_port, start_broker, start_redis, stop_pid  # noqa: E402
from learner.batch import decode_batch  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402


def make_events(n: int) -> list[dict]:
    """``n`` MovieLens clicks; beyond the dataset, copies with fresh ids, each later in time."""
    base = click_events(load_movielens(), 0, n)
    times = [e["ts"] for e in base]
    span = max(times) - min(times) + 1
    return [dict(e, event_id=f"{e['event_id']}#{k}", ts=e["ts"] + k * span)
            for k in range(-(-n // len(base))) for e in base][:n]


def collect_rows(kafka: str, topic: str, want: int, timeout: float) -> list:
    """Every row of ``topic`` as (partition, offset, sub, row bytes), once ``want`` distinct
    (partition, offset, sub) are seen."""
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest",
                             enable_auto_commit=False, fetch_max_wait_ms=50)
    rows: dict[tuple[int, int, int], bytes] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(rows) < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(rows)} of {want} rows arrived")
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    b = decode_batch(r.value)
                    t = b.table
                    names = t.column_names
                    cols = [t.column(n).to_pylist() for n in names]
                    offsets, subs = t.column("offset").to_pylist(), t.column("sub").to_pylist()
                    for i in range(t.num_rows):
                        key = (b.source_partition, offsets[i], subs[i])
                        row = json.dumps([names, [c[i] for c in cols]], default=str).encode()
                        if key in rows and rows[key] != row:
                            raise RuntimeError(f"row {key} came twice with different contents")
                        rows[key] = row
        time.sleep(1.0)  # anything more (a duplicate message) would show as a new key
        for records in consumer.poll(timeout_ms=500).values():
            for r in records:
                b = decode_batch(r.value)
                for off, sub in zip(b.table.column("offset").to_pylist(), b.table.column("sub").to_pylist(),
                                    strict=True):
                    if (b.source_partition, off, sub) not in rows:
                        raise RuntimeError("more rows than events")
    finally:
        consumer.close()
    return sorted(rows.items())


def redis_state(client: redis.Redis, dump=None) -> dict[str, str]:
    """Hashes of the click path's state in Redis, by kind (``dump``: a file to write it to)."""
    h = {k: hashlib.sha256() for k in ("counters", "histories", "id_window", "offsets")}
    keys = sorted(client.scan_iter(match="{hw:p*", count=1000))
    n = {k: 0 for k in h}
    for key in keys:
        name = key.decode()
        kind = client.type(key).decode()
        if ":pit:" in name or name.endswith(":writer"):
            continue
        if ":ids:" in name or ":idp:" in name:
            what = "id_window"
        elif name.endswith(":offsets"):
            what = "offsets"
        elif ":~h2:" in name:
            what = "histories"
        else:
            what = "counters"
        if kind == "hash":
            value = sorted(client.hgetall(key).items())
        elif kind == "string":
            value = client.get(key)
        else:
            value = f"<{kind}>"
        h[what].update(repr((name, value)).encode())
        if dump is not None:
            dump.write(repr((name, value)) + "\n")
        n[what] += 1
    return {k: f"{v.hexdigest()[:16]} ({n[k]} keys)" for k, v in h.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--envelope", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--dump", help="also write the rows and the state, one per line, to this file")
    args = ap.parse_args()
    events = make_events(args.events)
    msgs = payloads(events, args.envelope)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = start_broker(log_path=work / "broker.log")
        rserver = start_redis(log_path=work / "redis.log")
        kafka, url = f"127.0.0.1:{broker.port}", rserver.extra["url"]
        prefix = "rh-"
        settings = Settings(topic_prefix=prefix, partitions=PARTITIONS)
        proc = None
        try:
            ensure_topics(settings, kafka)
            produce_all(kafka, settings.topics["clicks"], msgs)
            env = dict(os.environ, HEADWATER_KAFKA=kafka, HEADWATER_REDIS=url,
                       HEADWATER_TOPIC_PREFIX=prefix, HEADWATER_PARTITIONS=str(PARTITIONS),
                       HEADWATER_CONTENT_ENCODER="hashing", HEADWATER_LOG_LEVEL="WARNING",
                       HEADWATER_STATE_DIR=str(work / "state"), HEADWATER_WORKER_PORT=str(free_port()))
            proc = start_service([sys.executable, "-m", "headwater", "worker"], env, work / "worker.log")
            rows = collect_rows(kafka, settings.topics["train-batches"], len(events), args.timeout)
            time.sleep(2.0)  # the last take's offsets and state settle
            client = redis.Redis.from_url(url)
            digest = hashlib.sha256()
            dump = open(args.dump, "w") if args.dump else None  # noqa: SIM115
            for key, row in rows:
                digest.update(repr(key).encode())
                digest.update(row)
                if dump is not None:
                    dump.write(f"{key} {row.decode()}\n")
            out = {"events": len(events), "envelope": args.envelope, "rows": len(rows),
                   "rows_sha": digest.hexdigest()[:16], **redis_state(client, dump)}
            if dump is not None:
                dump.close()
            client.close()
            print(json.dumps(out), flush=True)
        finally:
            if proc is not None:
                stop_pid(proc.pid)
            rserver.stop()
            broker.stop()


if __name__ == "__main__":
    main()
