"""Helpers for tests that run real Headwater processes against the real broker and Redis."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from headwater.servers import free_port, stop_pid

REPO = Path(__file__).resolve().parent.parent
_LOG_SEQ = itertools.count()


def service_env(kafka: str, redis_url: str, prefix: str, tmp: Path, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HEADWATER_KAFKA": kafka,
        "HEADWATER_REDIS": redis_url,
        "HEADWATER_TOPIC_PREFIX": prefix,
        "HEADWATER_STATE_DIR": str(tmp / "state"),
        "HEADWATER_MODEL_STORE": str(tmp / "models"),
        "HEADWATER_WORKER_PORT": str(free_port()),
        "HEADWATER_LEARNER_PORT": str(free_port()),
        "HEADWATER_HTTP_PORT": str(free_port()),
        "HEADWATER_PARTITIONS": "4",
        "HEADWATER_SESSION_TIMEOUT": "2",
        "HEADWATER_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Service:
    """A ``python -m headwater <name>`` child process with its log file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        log_dir.mkdir(parents=True, exist_ok=True)
        # unique even for services started within the same millisecond (they would
        # otherwise share, and truncate, one log file)
        self.log_path = log_dir / f"{name}-{int(time.time() * 1000)}-{next(_LOG_SEQ)}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "headwater", name], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True)

    def kill9(self) -> None:
        os.killpg(os.getpgid(self.proc.pid), 9)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout=10, proc=self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.2,
               what: str = "condition", on_fail: Callable[[], str] | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    detail = on_fail() if on_fail else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last={last!r})\n{detail[-4000:]}")


async def wait_until_async(predicate: Callable[[], object], timeout: float = 10.0,
                           interval: float = 0.005, what: str = "condition"):
    """:func:`wait_until` for a condition another task or connection of the running event
    loop makes true (the loop keeps running while it waits)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_topic(bootstrap: str, topic: str, timeout: float = 2.0) -> list:
    """Every record currently in ``topic`` (all partitions), without a consumer group."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=int(timeout * 1000), fetch_max_wait_ms=50)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out = []
        deadline = time.monotonic() + timeout + 5
        while time.monotonic() < deadline and any(consumer.position(tp) < end[tp] for tp in tps):
            for batch in consumer.poll(timeout_ms=200).values():
                out.extend(batch)
        return out
    finally:
        consumer.close()


def read_json_topic(bootstrap: str, topic: str, timeout: float = 2.0) -> list[dict]:
    return [json.loads(r.value) for r in read_topic(bootstrap, topic, timeout)]


def train_event_ids(bootstrap: str, topic: str) -> list[str]:
    """Event ids of every row currently on a train-batches topic (duplicates kept)."""
    from learner.batch import decode_batch

    ids: list[str] = []
    for rec in read_topic(bootstrap, topic):
        ids.extend(map(str, decode_batch(rec.value).event_ids))
    return ids


def alerts_in_redis(redis_url: str, host: str, min_severity: str = "medium") -> list[dict]:
    """Alerts stored for ``GET /v1/alerts`` (newest first), read with the serving code."""
    import asyncio

    import redis.asyncio as aioredis

    from detection.alert_store import query_alerts

    async def go():
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await query_alerts(client, host=host, min_severity=min_severity)
        finally:
            await client.aclose()

    return asyncio.run(go())


def hw(env: dict[str, str], *args: str, timeout: float = 180, check: bool = True):
    """``python -m headwater ARGS`` with ``env``; output captured as text."""
    return subprocess.run([sys.executable, "-m", "headwater", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=check)


def embedded_stack_env(tmp: Path, **extra) -> dict[str, str]:
    """Environment for ``headwater up``: throwaway state under ``tmp``, free ports, the
    hashing content encoder (no model load), embedded broker and Redis."""
    env = dict(os.environ)
    env.update({
        "HEADWATER_STATE_DIR": str(tmp / "state"),
        "HEADWATER_MODEL_STORE": str(tmp / "state" / "models"),
        "HEADWATER_KAFKA_PORT": "0", "HEADWATER_REDIS_PORT": "0",
        "HEADWATER_HTTP_PORT": str(free_port()), "HEADWATER_WORKER_PORT": str(free_port()),
        "HEADWATER_LEARNER_PORT": str(free_port()), "HEADWATER_CONTENT_ENCODER": "hashing",
    })
    env.update({k: str(v) for k, v in extra.items()})
    env.pop("HEADWATER_KAFKA", None)
    env.pop("HEADWATER_REDIS", None)
    return env
