"""Service heartbeats: each process publishes its status to Redis, anyone reads them all.

Every service (worker, learner, serving) writes a small JSON document under
``hw:status:<service>:<instance>`` every few seconds with a TTL of a few periods, so a
dead process disappears by itself and ``headwater status`` / ``GET /v1/status`` need
no registry of their own. Like settings, this module is imported by every service.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from core.redis_client import amget, mget

PREFIX = "hw:status:"
PERIOD_S = 2.0
TTL_S = 10


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
    client.set(status_key(doc["service"], doc["instance"]), encode(doc), ex=TTL_S)


async def publish_async(client, doc: dict[str, Any]) -> None:
    """Write a status document with a ``redis.asyncio`` client."""
    await client.set(status_key(doc["service"], doc["instance"]), encode(doc), ex=TTL_S)


def read_all_sync(client) -> list[dict[str, Any]]:
    """Every live service's status, sorted by service then instance."""
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(f"{PREFIX}*"))
    if not keys:
        return []
    docs = [json.loads(v) for v in mget(client, keys) if v]
    return sorted(docs, key=lambda d: (d.get("service", ""), d.get("instance", "")))


async def read_all_async(client) -> list[dict[str, Any]]:
    keys = sorted([k.decode() if isinstance(k, bytes) else k async for k in client.scan_iter(f"{PREFIX}*")])
    if not keys:
        return []
    docs = [json.loads(v) for v in await amget(client, keys) if v]
    return sorted(docs, key=lambda d: (d.get("service", ""), d.get("instance", "")))
