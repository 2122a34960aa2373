"""Click path throughput and latency, end to end on the embedded broker and Redis.

Measures, in one run and on the same pre-produced MovieLens events:

* the real worker (decode → counters in Redis → point-in-time rows → Arrow on
  ``train-batches``), and beside it a bare Faust agent that only counts the same
  stream (same app settings, ``take_events`` batches, the count kept in Redis);
* single-event messages and batched envelopes (JSON arrays of ``--envelope`` events);
* Redis commands per event (``INFO commandstats`` before/after);
* per process (consumer, redis-server, broker): CPU seconds and run-queue wait seconds
  (runnable, no free core) from the first output on, to tell the machine from the product;
* produce → row-on-``train-batches`` latency at a steady rate (p50/p99).

Envelopes run on ``--envelope-events`` (default 200,000: enough takes for the bare
agent too); events beyond MovieLens's own repeat it with fresh ids, each copy later in
time. ``--kinds`` picks the consumers: ``bare``, ``worker`` (one ``headwater worker`` on a
pre-produced backlog), ``workers2`` (two of them, produced once the group has settled).
``BENCH_PYSPY=<dir>`` records each worker with py-spy.

Run: ``.venv/bin/python bench/click_path.py`` (``--events``, ``--envelope``, ``--rate``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import redis
from kafka import KafkaConsumer, KafkaProducer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.settings import Settings  # noqa: E402
from features.movielens import click_events, load_movielens  # noqa: E402
from headwater.servers import free_port, start_broker, start_redis, stop_pid  # noqa: E402
from learner.batch import decode_batch  # noqa: E402
from streams.topics import ensure_topics, partition_of  # noqa: E402

PARTITIONS = 4


def bare_worker_main(kafka: str, redis_url: str, prefix: str) -> None:
    """A Faust worker whose agent only counts events (the baseline)."""
    import asyncio

    import faust
    import redis.asyncio as aioredis

    from streams.app import create_app

    settings = Settings(topic_prefix=prefix, partitions=PARTITIONS)
    app = create_app(settings, kafka, app_id=f"{prefix}bare")
    client = aioredis.Redis.from_url(redis_url)
    topic = app.topic(settings.topics["clicks"], value_type=bytes, value_serializer="raw")

    @app.agent(topic)
    async def count(stream):
        async for events in stream.take_events(settings.click_batch_size, within=settings.click_batch_within):
            n = 0
            for ev in events:
                v = ev.message.value
                n += v.count(b'"event_id"') if v[:1] == b"[" else 1
            now = time.time()
            pipe = client.pipeline(transaction=False)
            pipe.set("bench:bare:first", json.dumps([now, n]), nx=True)
            pipe.set("bench:bare:last", now)
            pipe.incrby("bench:bare:count", n)
            await pipe.execute()

    worker = faust.Worker(app, loglevel="warning", quiet=True)
    asyncio.set_event_loop(worker.loop)
    worker.execute_from_commandline()


def payloads(events: list[dict], envelope: int) -> list[tuple[int, bytes]]:
    """(partition, message) for every message: events partitioned by user, single or in
    envelopes of ``envelope`` (serialised before any timing starts)."""
    parts = partition_of([e["user_id"] for e in events], PARTITIONS)
    if envelope <= 1:
        return [(int(p), json.dumps(ev).encode()) for ev, p in zip(events, parts, strict=True)]
    out: list[tuple[int, bytes]] = []
    buffers: dict[int, list] = {p: [] for p in range(PARTITIONS)}
    for ev, p in zip(events, parts, strict=True):
        buffers[int(p)].append(ev)
        if len(buffers[int(p)]) >= envelope:
            out.append((int(p), json.dumps(buffers[int(p)]).encode()))
            buffers[int(p)] = []
    out += [(p, json.dumps(buf).encode()) for p, buf in buffers.items() if buf]
    return out


def produce_all(kafka: str, topic: str, messages: list[tuple[int, bytes]]) -> int:
    producer = KafkaProducer(bootstrap_servers=kafka, linger_ms=20, batch_size=1 << 20,
                             max_request_size=8 << 20)
    for p, value in messages:
        producer.send(topic, value, partition=p)
    producer.flush()
    producer.close()
    return len(messages)


def settled(client: redis.Redis, workers: int) -> bool:
    """Every worker's heartbeat is in and each holds some clicks partition, all of them held."""
    from core.health import read_all_sync

    docs = [d for d in read_all_sync(client) if d.get("service") == "worker"]
    held = [sum(len(v) for k, v in (d.get("assigned") or {}).items() if k.endswith("clicks"))
            for d in docs]
    return len(held) == workers and all(held) and sum(held) == PARTITIONS


def redis_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if not k.endswith(("info", "config")))


def redis_top(client: redis.Redis, n: int = 6) -> dict[str, int]:
    """The ``n`` commands Redis ran most often (those scripts run included)."""
    stats = client.info("commandstats")
    top = sorted(((v["calls"], k.removeprefix("cmdstat_")) for k, v in stats.items()), reverse=True)
    return {k: c for c, k in top[:n]}


def worker_batches(port: int) -> dict:
    """Mean events and handler seconds per click batch, from the worker's /metrics."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    vals: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("headwater_batch_events_sum", "headwater_batch_events_count",
                     "headwater_batch_seconds_sum", "headwater_batch_seconds_count"):
            if line.startswith(name + "{") and "clicks" in line:
                vals[name] = float(line.rsplit(" ", 1)[1])
    n = vals.get("headwater_batch_events_count") or float("nan")
    return {"batches": n, "events_per_batch": vals.get("headwater_batch_events_sum", 0) / n,
            "handler_ms_per_batch": 1000 * vals.get("headwater_batch_seconds_sum", 0) / n}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, every thread included (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sched(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process, all its
    threads (/proc/<pid>/task/*/schedstat): the wait is what a shared machine costs it."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:
            continue
        run, wait = run + int(fields[0]), wait + int(fields[1])
    return run / 1e9, wait / 1e9


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's main thread (``main``) and of all its other threads
    (``threads``: Faust's consumer thread, executors, the Kafka clients' I/O threads)."""
    main = rest = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        if task.name == str(pid):
            main += cpu
        else:
            rest += cpu
    return {"main": main, "threads": rest}


def start_service(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)


class RowWatcher:
    """Counts rows arriving on train-batches, with the wall time of the first and last;
    ``ids`` the distinct event ids, ``last_new_t`` when the last new one arrived.

    It reads the topic as the learner does (``fetch_max_wait_ms=50``, learner/kafka_loop.py).
    With ``keep_ids=False`` it only counts each message's Arrow rows and keeps no ids: the
    observer of a throughput run then costs ~0.3 µs of CPU per row instead of ~8–10 µs
    (a full ``decode_batch`` and a set of every id), CPU it took from the two cores the
    measured processes share.
    """

    def __init__(self, kafka: str, topic: str, keep_ids: bool = True) -> None:
        self.count = 0
        self.first_t: float | None = None
        self.last_t: float | None = None
        self.last_new_t: float | None = None
        self.ids: set[str] = set()
        self.first_n = 0
        self._stop = threading.Event()
        self.keep_ids = keep_ids
        self._consumer = KafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest",
                                       fetch_max_wait_ms=50, enable_auto_commit=False)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=100).values():
                for r in records:
                    if self.keep_ids:
                        ids = decode_batch(r.value).event_ids
                        n = len(ids)
                    else:
                        n = pa.ipc.open_stream(pa.py_buffer(r.value)).read_all().num_rows
                    now = time.time()
                    if self.first_t is None:
                        self.first_t, self.first_n = now, n
                    self.last_t = now
                    self.count += n
                    if self.keep_ids:
                        before = len(self.ids)
                        self.ids.update(map(str, ids))
                        if len(self.ids) > before:
                            self.last_new_t = now
        self._consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def worker_count(kind: str) -> int:
    """``worker``: one ``headwater worker``; ``workers2``: two of them on the partitions."""
    return int(kind.removeprefix("workers") or 1) if kind.startswith("workers") else 1


def run_mode(kind: str, events: list[dict], envelope: int, workdir: Path) -> dict:
    """Time first → last event processed by ``kind`` (``bare``, ``worker``, ``workersN``).

    ``bare`` and ``worker`` consume a pre-produced backlog. ``workersN`` starts N worker
    processes first and produces once the group has settled (every worker holding some
    partition), so that no rebalance falls inside the timing; the messages are
    serialised before, so producing costs the bench only the sends.
    """
    broker = start_broker(log_path=workdir / f"broker-{kind}-{envelope}.log")
    rserver = start_redis(log_path=workdir / f"redis-{kind}-{envelope}.log")
    kafka, url = f"127.0.0.1:{broker.port}", rserver.extra["url"]
    prefix = f"b{envelope}{kind}-"
    settings = Settings(topic_prefix=prefix, partitions=PARTITIONS)
    ensure_topics(settings, kafka)
    client = redis.Redis.from_url(url)
    msgs = payloads(events, envelope)
    n_workers = worker_count(kind) if kind != "bare" else 0
    settle = kind.startswith("workers")
    procs: list[subprocess.Popen] = []
    ports: list[int] = []
    try:
        if not settle:
            produce_all(kafka, settings.topics["clicks"], msgs)
        env = dict(os.environ, HEADWATER_KAFKA=kafka, HEADWATER_REDIS=url, HEADWATER_TOPIC_PREFIX=prefix,
                   HEADWATER_PARTITIONS=str(PARTITIONS),
                   HEADWATER_CONTENT_ENCODER="hashing", HEADWATER_LOG_LEVEL="WARNING",
                   HEADWATER_STATE_DIR=str(workdir / "state"))
        if kind == "bare":
            procs.append(start_service([sys.executable, __file__, "--role", "bare", kafka, url, prefix],
                                       env, workdir / f"bare-{envelope}.log"))

            def progress():
                first = client.get("bench:bare:first")
                if not first:
                    return 0, None, None, 0
                t_first, n_first = json.loads(first)
                return int(client.get("bench:bare:count") or 0), t_first, float(client.get("bench:bare:last")), n_first
        else:
            for i in range(n_workers):
                ports.append(free_port())
                procs.append(start_service([sys.executable, "-m", "headwater", "worker"],
                                           dict(env, HEADWATER_WORKER_PORT=str(ports[-1])),
                                           workdir / f"{kind}-{i}-{envelope}.log"))
            rows = RowWatcher(kafka, settings.topics["train-batches"], keep_ids=False)

            def progress():
                return rows.count, rows.first_t, rows.last_t, rows.first_n
        if settle:
            deadline = time.monotonic() + 180
            while not settled(client, n_workers):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{n_workers} workers did not settle on {PARTITIONS} partitions")
                time.sleep(0.2)
        calls0 = redis_calls(client)
        cmds0 = client.info("stats")["total_commands_processed"]
        if settle:
            produce_all(kafka, settings.topics["clicks"], msgs)
        spies = []
        if kind != "bare" and os.environ.get("BENCH_PYSPY"):  # a profile of each worker
            for proc in procs:
                out = Path(os.environ["BENCH_PYSPY"]) / f"{kind}-{envelope}-{proc.pid}.txt"
                spies.append(subprocess.Popen(
                    ["py-spy", "record", "-p", str(proc.pid), "-r", "100", "-f", "raw",
                     "-o", str(out), "--threads"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 600
        cpu0 = n0 = None
        pids = {**{f"consumer{i}": p.pid for i, p in enumerate(procs)},
                "redis": rserver.pid, "broker": broker.pid}
        while time.monotonic() < deadline:
            n, t_first, t_last, n_first = progress()
            if cpu0 is None and t_first is not None:
                # CPU from the first output on: start-up and the group join left out
                cpu0, n0 = sum(cpu_seconds(p.pid) for p in procs), n
                bench0 = time.process_time()  # this process: the row watcher (and producer)
                sched0 = {k: sched(v) for k, v in pids.items()}
                threads0 = [thread_cpu(p.pid) for p in procs]
            if n >= len(events):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{kind} did not finish: {progress()[0]} of {len(events)}")
        if kind != "bare":
            rows.stop()
        seconds = t_last - t_first
        rate = (len(events) - n_first) / seconds if seconds > 0 else float("nan")
        counted = max(1, len(events) - n0)
        cpu_us = 1e6 * (sum(cpu_seconds(p.pid) for p in procs) - cpu0) / counted
        # Per process, from the first output on: CPU seconds and run-queue wait seconds
        # (runnable, no free core: other processes, ours or other engineers').
        sched1 = {k: sched(v) for k, v in pids.items()}
        threads1 = [thread_cpu(p.pid) for p in procs]
        per_thread = {f"consumer_{w}_cpu_us_per_event":
                      1e6 * sum(t1[w] - t0[w] for t0, t1 in zip(threads0, threads1, strict=True)) / counted
                      for w in ("main", "threads")}
        share = {f"{k}_{w}_s": round(sched1[k][i] - sched0[k][i], 3)
                 for k in pids for i, w in enumerate(("cpu", "wait"))}
        per_event = {f"{k}_cpu_us_per_event": 1e6 * (sched1[k][0] - sched0[k][0]) / counted
                     for k in ("redis", "broker")}
        calls = redis_calls(client) - calls0
        extra: dict = {}
        for port in ports:
            for k, v in worker_batches(port).items():
                extra[k] = extra.get(k, 0.0) + v
        if ports:  # per batch: means over every worker's batches
            b = extra.get("batches") or float("nan")
            extra = {"batches": b,
                     "events_per_batch": len(events) / b,
                     "handler_ms_per_batch": extra.get("handler_ms_per_batch", 0.0) / len(ports)}
        for spy in spies:
            spy.send_signal(2)
            spy.wait(30)
        return {"kind": kind, "envelope": envelope, "events": len(events), "messages": len(msgs),
                "events_per_s": rate, "cpu_us_per_event": cpu_us,
                "bench_cpu_us_per_event": 1e6 * (time.process_time() - bench0) / counted, "load": os.getloadavg()[0],
                "redis_calls_per_event": calls / len(events),
                "redis_commands_per_event": (client.info("stats")["total_commands_processed"] - cmds0)
                / len(events),
                "seconds": seconds, **share, **per_event, **per_thread, "redis_top": redis_top(client), **extra}
    finally:
        for proc in procs:
            stop_pid(proc.pid)
        client.close()
        rserver.stop()
        broker.stop()


def latency(events: list[dict], rate: float, workdir: Path, seconds: float) -> dict:
    """Steady single-event produce at ``rate``; time until each row is on train-batches."""
    broker = start_broker(log_path=workdir / "broker-lat.log")
    rserver = start_redis(log_path=workdir / "redis-lat.log")
    kafka, url = f"127.0.0.1:{broker.port}", rserver.extra["url"]
    prefix = "lat-"
    settings = Settings(topic_prefix=prefix, partitions=PARTITIONS)
    ensure_topics(settings, kafka)
    env = dict(os.environ, HEADWATER_KAFKA=kafka, HEADWATER_REDIS=url, HEADWATER_TOPIC_PREFIX=prefix,
               HEADWATER_PARTITIONS=str(PARTITIONS), HEADWATER_WORKER_PORT=str(free_port()),
               HEADWATER_CONTENT_ENCODER="hashing", HEADWATER_LOG_LEVEL="WARNING",
               HEADWATER_STATE_DIR=str(workdir / "state-lat"))
    proc = start_service([sys.executable, "-m", "headwater", "worker"], env, workdir / "worker-lat.log")
    client = redis.Redis.from_url(url)
    sent: dict[str, float] = {}
    arrived: dict[str, float] = {}
    stop = threading.Event()

    def consume():
        consumer = KafkaConsumer(settings.topics["train-batches"], bootstrap_servers=kafka,
                                 auto_offset_reset="earliest", fetch_max_wait_ms=10,
                                 enable_auto_commit=False)
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=50).values():
                now = time.perf_counter()
                for r in records:
                    for eid in decode_batch(r.value).event_ids:
                        arrived.setdefault(str(eid), now)
        consumer.close()

    try:
        while not client.keys("hw:status:worker*"):
            time.sleep(0.2)
        time.sleep(2.0)  # let the group settle
        t = threading.Thread(target=consume, daemon=True)
        t.start()
        producer = KafkaProducer(bootstrap_servers=kafka, linger_ms=0)
        parts = partition_of([e["user_id"] for e in events], PARTITIONS)
        interval = 1.0 / rate
        start = time.perf_counter()
        n = min(len(events), int(rate * seconds))
        for i in range(n):
            target = start + i * interval
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ev = events[i]
            sent[ev["event_id"]] = time.perf_counter()
            producer.send(settings.topics["clicks"], json.dumps(ev).encode(), partition=int(parts[i]))
            producer.flush() if i % 10 == 0 else None
        producer.flush()
        deadline = time.monotonic() + 30
        while len(arrived) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        t.join(5)
        lat = sorted((arrived[k] - v) * 1000 for k, v in sent.items() if k in arrived)
        return {"rate": rate, "events": n, "received": len(lat),
                "p50_ms": lat[len(lat) // 2] if lat else float("nan"),
                "p99_ms": lat[int(len(lat) * 0.99) - 1] if lat else float("nan")}
    finally:
        stop_pid(proc.pid)
        client.close()
        rserver.stop()
        broker.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        bare_worker_main(*sys.argv[3:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000, help="events with single-event messages")
    ap.add_argument("--envelope-events", type=int, default=200000,
                    help="events in envelopes (enough that the bare agent takes many batches)")
    ap.add_argument("--envelope", type=int, default=200)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--latency-seconds", type=float, default=15.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--kinds", default="bare,worker", help="which consumers to run (comma list)")
    ap.add_argument("--modes", default="single,envelope", help="single and/or envelope")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    modes = [m for m in (1, args.envelope) if ("single" if m == 1 else "envelope") in args.modes]
    ml = load_movielens()

    def make_events(n: int) -> list[dict]:
        base = click_events(ml, 0, min(n, len(ml)))
        # More events than the dataset holds: repeat it with fresh event ids, each copy
        # later in time than the one before (as live traffic goes on), not the same
        # times again: a second copy at the first one's times would make every event of it
        # a late event, older than everything its entities already counted.
        times = [e["ts"] for e in base]
        span = max(times) - min(times) + 1
        return [dict(e, event_id=f"{e['event_id']}#{k}", ts=e["ts"] + k * span)
                for k in range(-(-n // len(base))) for e in base][:n]

    per_mode = {1: make_events(args.events)}
    if args.envelope > 1 and args.envelope in modes:
        per_mode[args.envelope] = make_events(args.envelope_events)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rep in range(args.repeat):
            for envelope in modes:
                for kind in (kinds if rep % 2 == 0 else kinds[::-1]):  # alternate the order
                    r = run_mode(kind, per_mode[envelope], envelope, work)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        lat = latency(per_mode[1], args.rate, work, args.latency_seconds) if args.latency_seconds > 0 else None
        print(json.dumps(lat), flush=True)

    def med(kind, env):
        got = [r["events_per_s"] for r in rows if r["kind"] == kind and r["envelope"] == env]
        return statistics.median(got) if got else float("nan")

    def med_cpu(kind, env, key="cpu_us_per_event"):
        got = [r[key] for r in rows if r["kind"] == kind and r["envelope"] == env]
        return statistics.median(got) if got else float("nan")

    loads = [r["load"] for r in rows]
    print(f"\nmedians of {args.repeat}; load average {min(loads):.1f}–{max(loads):.1f} "
          "(consumer CPU per event: its processes' user+system time from the first output on)")
    print("\n| messages | Headwater | bare agent events/s | Headwater events/s | ratio | "
          "bare CPU µs/event | Headwater CPU µs/event | ratio per CPU-second | Redis calls/event | "
          "Headwater: broker + redis-server CPU µs/event |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for env in modes:
        for kind in (k for k in kinds if k != "bare"):
            bare, real = med("bare", env), med(kind, env)
            calls = med_cpu(kind, env, "redis_calls_per_event")
            label = "single events" if env == 1 else f"envelopes of {env}"
            procs = worker_count(kind)
            who = "1 worker" if procs == 1 else f"{procs} workers"
            cb, cr = med_cpu("bare", env), med_cpu(kind, env)
            print(f"| {label} | {who} | {bare:,.0f} | {real:,.0f} | {real / bare:.2f} | {cb:,.0f} | "
                  f"{cr:,.0f} | {cb / cr:.2f} | {calls:.3f} | "
                  f"{med_cpu(kind, env, 'broker_cpu_us_per_event'):,.0f} + "
                  f"{med_cpu(kind, env, 'redis_cpu_us_per_event'):,.0f} |")
    if lat is None:
        return
    print(f"\nproduce → row on train-batches at {lat['rate']:.0f} events/s (single-event messages): "
          f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms ({lat['received']}/{lat['events']} rows)")


if __name__ == "__main__":
    main()
