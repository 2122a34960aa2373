"""Alerts kept in Redis for ``GET /v1/alerts``: one JSON document per alert id, updated as
its chain grows, and a time index per host.

Keys: ``hw:alert:<id>`` (JSON), ``hw:alerts:ts`` (sorted set, score = alert ``ts``,
member = id) and ``hw:alerts:host:<host>`` (the same, per host). The client is injected:
this module does no I/O of its own beyond the calls on it.
"""

from __future__ import annotations

import json
from typing import Any

from core.redis_client import amget

MAX_ALERTS = 10_000


def _ts(alert: dict[str, Any]) -> float:
    return float(alert.get("last_ts") or alert.get("ts") or 0.0)


async def save_alerts(client, alerts: list[dict[str, Any]], max_alerts: int = MAX_ALERTS) -> None:
    """Upsert alerts (``redis.asyncio`` client), keeping the newest ``max_alerts``."""
    if not alerts:
        return
    pipe = client.pipeline(transaction=False)
    for alert in alerts:
        aid = alert["id"]
        pipe.set(f"hw:alert:{aid}", json.dumps(alert, default=str))
        pipe.zadd("hw:alerts:ts", {aid: _ts(alert)})
        pipe.zadd(f"hw:alerts:host:{alert.get('host', 'unknown')}", {aid: _ts(alert)})
    pipe.zremrangebyrank("hw:alerts:ts", 0, -max_alerts - 1)
    await pipe.execute()


async def query_alerts(client, host: str | None = None, since: float | None = None,
                       until: float | None = None, min_severity: str | None = None,
                       limit: int = 100) -> list[dict[str, Any]]:
    """Newest first, filtered by host, time range and minimum severity."""
    key = f"hw:alerts:host:{host}" if host else "hw:alerts:ts"
    ids = await client.zrevrangebyscore(key, until if until is not None else "+inf",
                                        since if since is not None else "-inf",
                                        start=0, num=max(limit * 4, limit))
    if not ids:
        return []
    docs = await amget(client, [f"hw:alert:{i.decode() if isinstance(i, bytes) else i}" for i in ids])
    order = ["low", "medium", "high", "critical"]
    floor = order.index(min_severity) if min_severity in order else 0
    out = []
    for raw in docs:
        if raw is None:
            continue
        alert = json.loads(raw)
        if order.index(alert.get("severity", "low")) >= floor:
            out.append(alert)
        if len(out) >= limit:
            break
    return out
