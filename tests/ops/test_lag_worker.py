"""`headwater lag --watch` against the real worker: lag rises while the worker is stopped,
falls after it restarts, and the Burrow-style statuses say so."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from kafka import KafkaProducer

from tests.stackutil import REPO, Service, service_env, wait_until

pytestmark = pytest.mark.integration


class Watch:
    """`headwater lag --watch --json` as a child process; its reports collected by a thread."""

    def __init__(self, env: dict) -> None:
        self.reports: list[dict] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "headwater", "lag", "--watch", "--json",
                                      "--interval", "0.5"], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.reports.append(json.loads(line))

    def group(self, name: str) -> dict | None:
        for report in reversed(self.reports):
            for g in report.get("groups", []):
                if g["group"] == name:
                    return g
        return None

    def group_after(self, name: str, t: float, timeout: float = 30.0) -> dict | None:
        """``name`` in the first report whose broker reads all began after wall time ``t``:
        the second report stamped after ``t`` (a report is stamped when its reads are done,
        and the watch takes one after the other)."""
        def second() -> dict | None:
            later = [r for r in self.reports if r["ts"] > t]
            return later[1] if len(later) > 1 else None

        report = wait_until(second, timeout, what=f"two lag reports after {t:.3f}")
        return next((g for g in report.get("groups", []) if g["group"] == name), None)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _clicks_lag(group: dict | None, topic: str) -> int | None:
    if group is None:
        return None
    parts = [p for p in group["partitions"] if p["topic"] == topic]
    return sum(p["lag"] or 0 for p in parts) if parts else None


def test_lag_rises_while_the_worker_is_stopped_and_falls_after(kafka_bootstrap, redis_url,
                                                               tmp_path, topic_prefix):
    env = service_env(kafka_bootstrap, redis_url, topic_prefix, tmp_path,
                      HEADWATER_CONTENT_ENCODER="hashing")
    group, topic = f"{topic_prefix}headwater-worker", f"{topic_prefix}clicks"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)

    def produce(n: int, start: int) -> None:
        for i in range(start, start + n):
            ev = {"event_id": f"lag-{i}", "ts": 880_000_000 + i, "user_id": f"u{i % 9}",
                  "item_id": f"i{i % 5}", "label": i % 2}
            producer.send(topic, json.dumps(ev).encode(), partition=i % 4)
        producer.flush()

    worker = Service("worker", env, tmp_path / "logs")
    watch = Watch(env)
    try:
        produce(40, 0)
        wait_until(lambda: (g := watch.group(group)) and _clicks_lag(g, topic) == 0
                   and g["status"] == "OK", 90, what="the worker caught up (OK, lag 0)",
                   on_fail=worker.log)
        worker.stop()
        # The worker is gone: lag rises with every batch produced, its commits are frozen.
        lags = []
        for k in range(8):
            produce(20, 1000 + 20 * k)
            lags.append(_clicks_lag(watch.group_after(group, time.time()), topic))
        assert lags[-1] > lags[0] > 0, lags
        # Frozen commits with lag: STOP on Apache Kafka. Tansu 0.6 keeps listing the departed
        # member in DescribeGroups, so the monitor sees "members but no progress": STALL.
        stopped = wait_until(lambda: (g := watch.group(group))
                             and g["status"] in ("STOP", "STALL", "WARNING") and g, 30,
                             what="a non-OK status while the worker is down",
                             on_fail=lambda: json.dumps(watch.group(group))[:1500])
        assert _clicks_lag(stopped, topic) >= 100
        worker = Service("worker", env, tmp_path / "logs")
        wait_until(lambda: (g := watch.group(group)) and _clicks_lag(g, topic) == 0
                   and g["status"] == "OK", 120, what="lag falling back to 0 and OK",
                   on_fail=worker.log)
    finally:
        watch.stop()
        worker.stop()
        producer.close()
