"""Audit records through the running stack: broker → worker's audit agent → alerts topic.

Real processes (Tansu broker, Redis, ``headwater worker``); the dev corpus logs are
replayed as many hosts (one host per log copy, so every copy builds its own graph and
baseline), in messages of ``--lines`` raw audit lines keyed by host, as
``headwater ship-audit`` sends them.

1. Throughput: ``--burst`` records produced as fast as the producer can; the worker's
   own counter (``headwater_events_in_total{topic="audit"}`` on ``/metrics``) is
   sampled every second; records/s = counted records / time from the first to the
   last change (the worker process runs the agent on one core: one audit thread).
   Per core: the same records divided by the CPU time the worker process used
   meanwhile (``/proc/PID/stat`` utime + stime: every thread of the worker, the Kafka
   client, the event loop, Redis writes and metrics included), which other users of a
   shared machine disturb far less than wall time. Baseline in the same run: the bare
   in-process engine (``DetectionEngine.process_lines`` per message, one engine per
   host) on the very same messages, per second of this process's CPU time.
2. Latency at ``--rate`` records/s for ``--seconds``: for each alert update on the
   alerts topic, latency = time the consumer received it − time the producer sent the
   line whose log timestamp equals the alert's ``ts`` (the record that completed the
   match: an alert cannot be emitted before that record was sent). The worker's CPU
   from the first send to 5 s after the last gives records per worker CPU-second at
   that rate, the fetch polls of an idle moment included.

    .venv/bin/python bench/detection_e2e.py [--rate 10000] [--seconds 30] [--burst 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kafka import KafkaConsumer  # noqa: E402

from core.health import read_all_sync  # noqa: E402
from core.settings import Settings, default_data_dir  # noqa: E402
from headwater.servers import free_port, start_broker, start_redis, stop_pid  # noqa: E402
from headwater.stack import spawn_service  # noqa: E402
from streams.producer import make_producer  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402

_TS = re.compile(rb"msg=audit\((\d+\.\d+):")
_COUNTER = re.compile(r'headwater_events_in_total\{topic="([^"]+)"\} ([0-9.e+]+)')


def corpus(benign: int) -> list[tuple[str, list[bytes]]]:
    """The dev corpus logs, and the first ``benign`` lines of each recorded benign day
    (``bench/benign_audit/data``: hosts with realistic graph sizes)."""
    from bench.detection_agent import load_logs

    os.environ.setdefault("HEADWATER_DATA_DIR", str(default_data_dir()))
    logs = load_logs(benign)
    return [(name, lines) for name, lines in logs if lines]


def messages(logs, copies: int, lines_per_msg: int, tag: str):
    """(host, [lines]) messages: copy c of every log interleaved message by message."""
    streams = []
    for c in range(copies):
        for name, lines in logs:
            host = f"{tag}{c}-{name}"
            streams.append([(host, lines[i:i + lines_per_msg])
                            for i in range(0, len(lines), lines_per_msg)])
    out = []
    depth = max(map(len, streams))
    for i in range(depth):
        out.extend(s[i] for s in streams if i < len(s))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_baseline(msgs) -> float:
    """Records per CPU-second of the bare in-process engine on the same messages."""
    from detection.engine import DetectionEngine

    engines: dict = {}
    n = 0
    cpu = time.process_time()
    for host, lines in msgs:
        eng = engines.get(host)
        if eng is None:
            eng = engines[host] = DetectionEngine(host=host)
        eng.process_lines(lines)
        n += len(lines)
    return n / (time.process_time() - cpu)


def worker_count(port: int) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return -1.0
    return sum(float(v) for t, v in _COUNTER.findall(text) if t.endswith("audit"))


def throughput(kafka, topic, port, msgs, pid: int) -> dict:
    base = worker_count(port)
    cpu0 = cpu_seconds(pid)
    total = sum(len(m) for _, m in msgs)
    prod = make_producer(kafka)
    t0 = time.monotonic()
    for host, lines in msgs:
        prod.send(topic, key=host.encode(), value=b"\n".join(lines))
    prod.flush()
    produced_s = time.monotonic() - t0
    samples = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), worker_count(port) - base))
        if samples[-1][1] >= total:
            break
        time.sleep(1.0)
    cpu = cpu_seconds(pid) - cpu0
    moving = [(t, n) for t, n in samples if n > 0]
    if len(moving) < 2:
        return {"records": total, "records_per_s": float("nan"), "produce_s": produced_s,
                "cpu_s": cpu, "records_per_cpu_s": float("nan")}
    (t_a, n_a), (t_b, n_b) = moving[0], moving[-1]
    return {"records": total, "counted": n_b, "records_per_s": (n_b - n_a) / (t_b - t_a),
            "produce_s": produced_s, "cpu_s": cpu, "records_per_cpu_s": n_b / cpu}


def latency(kafka, topic, alerts_topic, msgs, rate, seconds, pid: int) -> dict:
    sent: dict[tuple[str, float], float] = {}
    got: list[float] = []
    stop = threading.Event()

    def consume():
        c = KafkaConsumer(alerts_topic, bootstrap_servers=kafka, auto_offset_reset="latest",
                          fetch_max_wait_ms=10, consumer_timeout_ms=500)
        c.poll(timeout_ms=1000)  # join and seek to the end before we produce
        ready.set()
        while not stop.is_set():
            for batch in c.poll(timeout_ms=50).values():
                now = time.monotonic()
                for r in batch:
                    a = json.loads(r.value)
                    t = sent.get((a["host"], round(float(a["ts"]), 3)))
                    if t is not None:
                        got.append(now - t)
        c.close()

    ready = threading.Event()
    th = threading.Thread(target=consume, daemon=True)
    th.start()
    ready.wait(30)
    prod = make_producer(kafka, linger_ms=5)
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    n = 0
    limit = rate * seconds
    for host, lines in msgs:
        if n >= limit:
            break
        due = t0 + n / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        now = time.monotonic()
        for line in lines:
            m = _TS.search(line)
            if m:
                sent.setdefault((host, round(float(m.group(1)), 3)), now)
        prod.send(topic, key=host.encode(), value=b"\n".join(lines))
        n += len(lines)
    prod.flush()
    achieved = n / (time.monotonic() - t0)
    time.sleep(5)
    cpu = cpu_seconds(pid) - cpu0  # the worker's CPU for these records, polls included
    stop.set()
    th.join(10)
    got.sort()
    q = lambda p: got[min(len(got) - 1, int(p * len(got)))] if got else float("nan")  # noqa: E731
    return {"records": n, "achieved_rate": achieved, "alert_updates": len(got), "cpu_s": cpu,
            "p50": q(0.5), "p99": q(0.99), "max": got[-1] if got else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=10_000)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--burst", type=int, default=200_000)
    ap.add_argument("--lines", type=int, default=100, help="audit lines per message")
    ap.add_argument("--benign", type=int, default=60_000,
                    help="lines of each recorded benign day added to the dev corpus (0: none)")
    args = ap.parse_args(argv)
    logs = corpus(args.benign)
    per_copy = sum(len(ls) for _, ls in logs)
    work = Path(tempfile.mkdtemp(prefix="hw-detect-e2e-"))
    broker = start_broker(log_path=work / "broker.log")
    rds = start_redis(log_path=work / "redis.log")
    kafka, url = f"127.0.0.1:{broker.port}", rds.extra["url"]
    settings = Settings(state_dir=work / "state", model_store=work / "state" / "models",
                        http_port=free_port(), worker_port=free_port(), learner_port=free_port(),
                        content_encoder="hashing")
    ensure_topics(settings, kafka)
    worker = spawn_service("worker", settings, kafka, url)
    try:
        import redis

        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 120
        while "worker" not in {d["service"] for d in read_all_sync(client)}:
            if time.monotonic() > deadline:
                raise SystemExit("worker did not come up")
            time.sleep(0.5)
        topic, alerts = settings.topics["audit"], settings.topics["alerts"]
        burst = messages(logs, max(1, args.burst // per_copy), args.lines, "tp")
        tp = throughput(kafka, topic, settings.worker_port, burst, worker.pid)
        print(f"throughput through the worker's audit agent: {tp['records']:,} records "
              f"(dev corpus + {args.benign:,} lines of each benign day, x{max(1, args.burst // per_copy)}, one host per copy), produced in "
              f"{tp['produce_s']:.1f} s; worker counted {tp.get('counted', 0):,.0f} at "
              f"{tp['records_per_s']:,.0f} records/s wall, {tp['records_per_cpu_s']:,.0f} "
              f"records per worker CPU-second ({tp['cpu_s']:.1f} CPU-s)")
        base = engine_baseline(burst)
        print(f"baseline, same messages, bare in-process engine: {base:,.0f} records per "
              f"CPU-second; worker / engine = {tp['records_per_cpu_s'] / base:.2f}; "
              f"load average {os.getloadavg()[0]:.1f}")
        lat_msgs = messages(logs, int(args.rate * args.seconds // per_copy) + 1, args.lines, "lt")
        lat = latency(kafka, topic, alerts, lat_msgs, args.rate, args.seconds, worker.pid)
        print(f"latency through the broker at {lat['achieved_rate']:,.0f} records/s "
              f"({lat['records']:,} records, {args.lines} lines per message): "
              f"{lat['alert_updates']} alert updates, record -> alert p50 {lat['p50'] * 1e3:.0f} ms, "
              f"p99 {lat['p99'] * 1e3:.0f} ms, max {lat['max'] * 1e3:.0f} ms; worker "
              f"{lat['cpu_s']:.1f} CPU-s from the first send to 5 s after the last "
              f"({lat['records'] / lat['cpu_s']:,.0f} records per worker CPU-second at this "
              f"rate); load average {os.getloadavg()[0]:.1f}")
    finally:
        stop_pid(worker.pid, timeout=20, proc=worker)
        rds.stop()
        broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
