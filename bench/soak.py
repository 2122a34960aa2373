"""Soak: the whole stack at a steady rate for N minutes, one fault injected per minute.

Real processes (Tansu broker, Redis with AOF, worker, learner, serving), real MovieLens
click events produced at ``--rate`` events/s (cycled with fresh event ids), scoring
requests at ``--qps``. Each minute one fault, in turn: kill -9 the worker (restart),
kill -9 the learner (restart), restart Redis, restart serving (with ``--serve-workers``
N > 1, the default 2: a rolling restart by SIGHUP while the others keep answering; with
1: SIGTERM and start again, and requests refused meanwhile are counted apart). Reports events
produced vs counted — per user and per item against a direct count of what was sent,
so a loss and a double count cannot cancel out — rows trained, models published and swapped, failed requests, and
the memory (RSS) of every process over time; and the learner's backlog (rows waiting on
``train-batches``, from its heartbeat every 2 s): its maximum and its course over time;
and freshness: click -> first scoring response from a model trained on it, probed one
click at a time all along (p50 / p99 / max, and the same over probes no fault overlapped).

Run: ``.venv/bin/python bench/soak.py --minutes 10`` (``--rate``, ``--qps``). The run's
directory under the system temp dir is deleted at the end (``--keep`` keeps it, logs included).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis
from kafka import KafkaProducer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.health import read_all_sync  # noqa: E402
from core.settings import Settings  # noqa: E402
from features.movielens import click_events, load_movielens  # noqa: E402
from features.store import SyncOnlineStore  # noqa: E402
from headwater.servers import free_port, start_broker, start_redis, stop_pid  # noqa: E402
from headwater.stack import spawn_service  # noqa: E402
from streams.topics import ensure_topics, partition_of  # noqa: E402


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


#: The soak's own traffic uses entities the replayed stream never has: serving logs every
#: answer to ``impressions`` and the joiner counts each one when its attribution window
#: closes (issue 17), and the freshness probes are clicks, so scoring MovieLens user 1 and
#: items 1-20 would add counts the per-entity check against the replay cannot expect.
LOAD_USER = "soak-load"
LOAD_ITEMS = [f"soak-item-{i}" for i in range(1, 21)]
PROBE_ITEM = "soak-probe"


class Producer(threading.Thread):
    def __init__(self, kafka: str, topic: str, events: list[dict], rate: float, partitions: int):
        super().__init__(daemon=True)
        self.kafka, self.topic, self.events, self.rate = kafka, topic, events, rate
        self.parts = partition_of([e["user_id"] for e in events], partitions)
        self.sent = 0
        self.stop = threading.Event()
        #: events sent per entity ("user:1", "item:50"): the direct count to check against
        self.per_entity: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        producer = KafkaProducer(bootstrap_servers=self.kafka, linger_ms=10, retries=20)
        start = time.monotonic()
        i = 0
        while not self.stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while i < due:
                k = i % len(self.events)
                ev = dict(self.events[k], event_id=f"{self.events[k]['event_id']}#{i // len(self.events)}")
                producer.send(self.topic, json.dumps(ev).encode(), partition=int(self.parts[k]))
                self.per_entity[f"user:{ev['user_id']}"] += 1
                self.per_entity[f"item:{ev['item_id']}"] += 1
                i += 1
            self.sent = i
            time.sleep(0.01)
        producer.flush()
        producer.close()


class Load(threading.Thread):
    def __init__(self, port: int, qps: float):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/v1/score"
        self.qps = qps
        self.ok = self.failed = self.refused = self.refused_unexpected = 0
        #: (seconds since the load started, what went wrong) of the first failures
        self.failures: list[tuple[float, str]] = []
        self.versions: set[str] = set()
        self.stop = threading.Event()
        self.serving_down = threading.Event()

    def _failed(self, start: float, what: str) -> None:
        self.failed += 1
        if len(self.failures) < 20:
            self.failures.append((round(time.monotonic() - start, 1), what))

    def run(self) -> None:
        body = json.dumps({"user_id": LOAD_USER, "candidates": LOAD_ITEMS}).encode()
        start = time.monotonic()
        while not self.stop.is_set():
            t0 = time.monotonic()
            req = urllib.request.Request(self.url, data=body, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    self.versions.add(json.loads(resp.read())["model_version"])
                    self.ok += 1
            except urllib.error.HTTPError as exc:
                if exc.code == 503 and not self.versions:
                    pass  # no model published yet: not a failure
                else:
                    detail = exc.read()[:300].decode("utf-8", "replace")
                    self._failed(start, f"HTTP {exc.code}: {detail}")
            except OSError as exc:
                refused = isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)
                if refused and self.serving_down.is_set():
                    self.refused += 1  # the only replica was deliberately down
                elif refused:
                    self.refused_unexpected += 1
                else:
                    self._failed(start, repr(exc))
            time.sleep(max(0.0, 1.0 / self.qps - (time.monotonic() - t0)))


class Freshness(threading.Thread):
    """Click -> first response from a model trained on it, one probe at a time.

    Each probe produces one click for a fresh user (to the partition the product's
    replay would use), then asks ``POST /v1/score`` for that user every ``poll`` seconds
    until the answering ``model_version``'s manifest has a watermark past the click's
    offset on its partition (``bench/serving_freshness.py``'s test). A probe that is not
    served within ``timeout`` seconds counts as timed out.
    """

    def __init__(self, kafka: str, topic: str, port: int, store: Path, partitions: int,
                 poll: float = 0.1, timeout: float = 120.0):
        super().__init__(daemon=True)
        self.kafka, self.topic, self.partitions = kafka, topic, partitions
        self.url = f"http://127.0.0.1:{port}/v1/score"
        self.store, self.poll, self.timeout = store, poll, timeout
        self.stop = threading.Event()
        self.probes: list[tuple[float, float]] = []  # (click time, seconds to served)
        self.timed_out = 0

    def _version(self, user: str) -> str | None:
        body = json.dumps({"user_id": user, "candidates": [PROBE_ITEM]}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read()).get("model_version")
        except (OSError, ValueError):
            return None

    def run(self) -> None:
        import uuid

        from bench.serving_freshness import trained_past

        producer = KafkaProducer(bootstrap_servers=self.kafka, linger_ms=0, retries=20)
        manifests: dict[str, dict] = {}
        while not self.stop.is_set():
            user = f"fresh-{uuid.uuid4().hex[:8]}"
            event = {"event_id": uuid.uuid4().hex, "ts": time.time(), "user_id": user,
                     "item_id": PROBE_ITEM, "label": 1, "context": {"device": "soak"}}
            part = int(partition_of([user], self.partitions)[0])
            t_click = time.monotonic()
            try:
                meta = producer.send(self.topic, json.dumps(event).encode(),
                                     partition=part).get(10)
            except Exception:  # noqa: BLE001 - the broker is fine in this soak; retry later
                self.stop.wait(1.0)
                continue
            while not self.stop.is_set():
                v = self._version(user)
                if v is not None and v not in manifests:
                    try:
                        manifests[v] = json.loads((self.store / v / "manifest.json").read_text())
                    except (OSError, ValueError):
                        v = None
                if v is not None and trained_past(manifests[v], [self.topic], meta.partition,
                                                  meta.offset):
                    self.probes.append((t_click, time.monotonic() - t_click))
                    break
                if time.monotonic() - t_click > self.timeout:
                    self.timed_out += 1
                    break
                self.stop.wait(self.poll)
            self.stop.wait(1.0)
        producer.close()


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 2)


def _freshness(fresh: Freshness, injected: list[tuple[int, str]], t0: float) -> dict:
    lat = [d for _, d in fresh.probes]
    quiet = [d for t, d in fresh.probes
             if not any(t - t0 - 1 <= at <= t - t0 + d for at, _ in injected)]
    return {"probes": len(lat), "timed_out": fresh.timed_out,
            "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "max": _pct(lat, 1.0),
            "quiet_probes": len(quiet), "quiet_p50": _pct(quiet, 0.5),
            "quiet_p99": _pct(quiet, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=300.0, help="click events per second")
    ap.add_argument("--qps", type=float, default=20.0, help="scoring requests per second")
    ap.add_argument("--drain-seconds", type=float, default=120.0,
                    help="after the producer stops, wait at most this long for every event "
                         "to be counted before the per-entity check")
    ap.add_argument("--serve-workers", type=int, default=2,
                    help="serving processes on one port; > 1 restarts serving by a rolling "
                         "restart (SIGHUP), 1 by stopping and starting the only one")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run's directory (logs, Redis data, model store); "
                         "by default it is deleted after the summary")
    args = ap.parse_args()
    os.environ["HEADWATER_SERVE_WORKERS"] = str(args.serve_workers)
    work = Path(tempfile.mkdtemp(prefix="hw-soak-"))
    broker = start_broker(log_path=work / "broker.log")
    redis_server = start_redis(data_dir=work / "redis", log_path=work / "redis.log")
    kafka, url = f"127.0.0.1:{broker.port}", redis_server.extra["url"]
    settings = Settings(state_dir=work / "state", model_store=work / "state" / "models",
                        http_port=free_port(), worker_port=free_port(), learner_port=free_port(),
                        content_encoder="hashing")
    ensure_topics(settings, kafka)
    procs = {name: spawn_service(name, settings, kafka, url) for name in ("worker", "learner", "serve")}
    client = redis.Redis.from_url(url)
    while {d["service"] for d in read_all_sync(client)} < {"worker", "learner", "serving"}:
        time.sleep(0.5)
    ml = load_movielens()
    producer = Producer(kafka, settings.topics["clicks"], click_events(ml), args.rate, settings.partitions)
    load = Load(settings.http_port, args.qps)
    fresh = Freshness(kafka, settings.topics["clicks"], settings.http_port,
                      settings.model_store / settings.model_name, settings.partitions)
    producer.start()
    load.start()
    fresh.start()
    faults = ["kill -9 worker", "kill -9 learner", "restart redis", "restart serving"]
    memory: list[dict] = []
    injected = []
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    next_fault = t0 + 30
    next_sample = t0
    next_backlog = t0
    backlog: list[tuple[int, int, int]] = []  # (seconds, learner backlog rows, rows trained)
    k = 0
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_backlog:
            try:
                docs = read_all_sync(client)
            except redis.RedisError:  # Redis is being restarted (a fault): sample next time
                docs = []
            doc = next((d for d in docs if d["service"] == "learner"), {})
            if doc.get("backlog_rows") is not None:
                backlog.append((round(now - t0), int(doc["backlog_rows"]),
                                int(doc.get("rows_trained") or 0)))
            next_backlog += 2
        if now >= next_sample:
            memory.append({"t": round(now - t0), **{n: round(rss_mb(p.pid), 1) for n, p in procs.items()},
                           "redis": round(rss_mb(redis_server.pid), 1)})
            next_sample += 10
        if now >= next_fault:
            fault = faults[k % len(faults)]
            k += 1
            injected.append((round(now - t0), fault))
            print(f"[{now - t0:6.0f}s] fault: {fault}", flush=True)
            if fault == "kill -9 worker":
                os.killpg(procs["worker"].pid, signal.SIGKILL)
                procs["worker"].wait()
                procs["worker"] = spawn_service("worker", settings, kafka, url)
            elif fault == "kill -9 learner":
                os.killpg(procs["learner"].pid, signal.SIGKILL)
                procs["learner"].wait()
                procs["learner"] = spawn_service("learner", settings, kafka, url)
            elif fault == "restart redis":
                port = redis_server.port
                redis_server.proc.kill()
                redis_server.proc.wait()
                time.sleep(1.0)
                redis_server = start_redis(port=port, data_dir=work / "redis", log_path=work / "redis2.log")
            elif args.serve_workers > 1:
                log_path = settings.log_dir / "serve.log"
                replaced = log_path.read_text(errors="replace").count(" replaced (pid ")
                os.kill(procs["serve"].pid, signal.SIGHUP)
                deadline = time.monotonic() + 300
                while (time.monotonic() < deadline and log_path.read_text(errors="replace")
                       .count(" replaced (pid ") < replaced + args.serve_workers):
                    time.sleep(0.5)
                print(f"[{time.monotonic() - t0:6.0f}s] rolling restart done", flush=True)
            else:
                load.serving_down.set()
                stop_pid(procs["serve"].pid)
                procs["serve"] = spawn_service("serve", settings, kafka, url)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{settings.http_port}/readyz", timeout=1):
                            break
                    except OSError:
                        time.sleep(0.1)
                load.serving_down.clear()
            next_fault += 60
        time.sleep(0.2)
    producer.stop.set()
    producer.join()
    fresh.stop.set()
    fresh.join()
    # Drain: wait until every produced event is counted (or --drain-seconds).
    store = SyncOnlineStore.from_url(url, partitions=settings.partitions)

    def counted(kind: str = "user") -> dict[str, int]:
        """Every sent entity's all-time impressions in Redis."""
        return {e: int(store.entity_features(e)["impressions_total"])
                for e in producer.per_entity if e.startswith(f"{kind}:")}

    drain_start = time.monotonic()
    deadline = drain_start + args.drain_seconds
    n_counted = sum(counted().values())
    while n_counted < producer.sent and time.monotonic() < deadline:
        time.sleep(2)
        n_counted = sum(counted().values())
    drain_s = time.monotonic() - drain_start
    # Per entity, against the direct count: a loss and a double count cannot cancel out.
    accounting = {}
    for kind in ("user", "item"):
        got = counted(kind)
        want = {e: n for e, n in producer.per_entity.items() if e.startswith(f"{kind}:")}
        accounting[kind] = {
            "entities": len(want),
            "lost": sum(max(0, n - got[e]) for e, n in want.items()),
            "counted_twice": sum(max(0, got[e] - n) for e, n in want.items()),
            "entities_wrong": sum(got[e] != n for e, n in want.items()),
        }
    time.sleep(10)  # let the learner publish and serving swap
    load.stop.set()
    load.join()
    status = {d["service"]: d for d in read_all_sync(client)}
    summary = {
        "minutes": args.minutes, "rate": args.rate, "faults": injected,
        "events_produced": producer.sent, "events_counted": n_counted,
        "drain_s": round(drain_s, 1),
        "lost": {kind: a["lost"] for kind, a in accounting.items()},
        "counted_twice": {kind: a["counted_twice"] for kind, a in accounting.items()},
        "accounting": accounting,
        # the load's served impressions the joiner has closed and counted so far (windows of
        # HEADWATER_JOIN_WINDOW_SECONDS): not part of the check above, shown for the record
        "load_impressions_counted": int(store.entity_features(f"user:{LOAD_USER}")["impressions_total"]),
        "rows_trained": status.get("learner", {}).get("rows_trained"),
        "learner_backlog_rows_max": max((b for _, b, _ in backlog), default=None),
        "learner_backlog_rows_last": backlog[-1][1] if backlog else None,
        "learner_backlog_every_30s": [b for b in backlog if b[0] % 30 < 2],
        "models_published": max((int(p.name) for p in (settings.model_store / settings.model_name).glob("0*")
                                 if p.name.isdigit()), default=0),
        "publications_last_learner": status.get("learner", {}).get("publications"),
        "swaps": status.get("serving", {}).get("swaps"),
        "requests_ok": load.ok, "requests_failed": load.failed, "failures": load.failures,
        "requests_refused_while_serving_restarted": load.refused,
        "requests_refused_otherwise": load.refused_unexpected,
        "serve_workers": args.serve_workers,
        "versions_served": len(load.versions),
        # click -> first /v1/score answer from a model trained on it (one probe at a time);
        # "quiet": probes with no fault injected between the click and the answer
        "freshness_s": _freshness(fresh, injected, t0),
        "memory_mb": memory,
    }
    print(json.dumps(summary, indent=1))
    for p in procs.values():
        stop_pid(p.pid)
    redis_server.stop()
    broker.stop()
    if args.keep:
        print(f"logs: {settings.log_dir}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
