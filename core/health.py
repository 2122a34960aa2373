"""Service heartbeats: each process publishes its status to Redis, anyone reads them all.

Every service (worker, learner, serving) writes a small JSON document under
``hw:status:<service>:<instance>`` every few seconds with a TTL of a few periods, so a
dead process disappears by itself and ``headwater status`` / ``GET /v1/status`` need
no registry of their own. Each write also stamps the key in the sorted set
``hw:status-index`` (score: the writer's clock), so readers fetch the live keys with
one range read instead of scanning the whole keyspace (a SCAN over every counter key,
every 2 s per serving process, was a quarter of a serving process's CPU); entries are
pruned once ``INDEX_KEEP_S`` old, and a dead process's entry points at an expired key,
which reads as nothing. Like settings, this module is imported by every service.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from core.redis_client import amget, mget

PREFIX = "hw:status:"
INDEX = "hw:status-index"
PERIOD_S = 2.0
TTL_S = 10
#: index entries older than this are dropped (generous: tolerates clock skew between hosts)
INDEX_KEEP_S = 60


def status_key(service: str, instance: str) -> str:
    return f"{PREFIX}{service}:{instance}"


def instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def make_status(service: str, started_at: float, **fields: Any) -> dict[str, Any]:
    """A status document: health, pid, uptime, plus the service's own fields."""
    now = time.time()
    doc = {
        "service": service,
        "instance": instance_id(),
        "pid": os.getpid(),
        "healthy": True,
        "started_at": started_at,
        "uptime_s": round(now - started_at, 1),
        "updated_at": now,
        "last_error": None,
    }
    doc.update(fields)
    return doc


def encode(doc: dict[str, Any]) -> str:
    return json.dumps(doc, default=str, allow_nan=False, separators=(",", ":"))


def publish_sync(client, doc: dict[str, Any]) -> None:
    """Write a status document with a synchronous redis client."""
    key = status_key(doc["service"], doc["instance"])
    client.set(key, encode(doc), ex=TTL_S)
    client.zadd(INDEX, {key: time.time()})


async def publish_async(client, doc: dict[str, Any]) -> None:
    """Write a status document with a ``redis.asyncio`` client."""
    key = status_key(doc["service"], doc["instance"])
    await client.set(key, encode(doc), ex=TTL_S)
    await client.zadd(INDEX, {key: time.time()})


def read_all_sync(client) -> list[dict[str, Any]]:
    """Every live service's status, sorted by service then instance."""
    client.zremrangebyscore(INDEX, "-inf", time.time() - INDEX_KEEP_S)
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in client.zrange(INDEX, 0, -1))
    if not keys:
        return []
    docs = [json.loads(v) for v in mget(client, keys) if v]
    return sorted(docs, key=lambda d: (d.get("service", ""), d.get("instance", "")))


async def read_all_async(client) -> list[dict[str, Any]]:
    await client.zremrangebyscore(INDEX, "-inf", time.time() - INDEX_KEEP_S)
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await client.zrange(INDEX, 0, -1))
    if not keys:
        return []
    docs = [json.loads(v) for v in await amget(client, keys) if v]
    return sorted(docs, key=lambda d: (d.get("service", ""), d.get("instance", "")))
