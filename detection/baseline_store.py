"""The learned per-host baseline (:mod:`detection.baseline`) in Redis, so it survives restarts.

One hash per host, ``hw:audit:baseline:<host>``: field = pattern key, value =
``"count,last_ts"`` (decayed count and log time of its last update), plus
``_observed``. The worker writes only the fields a batch changed and refreshes
the key's TTL on every write, so a host's baseline lives while the host keeps
sending audit records and disappears ``ttl`` seconds after its last batch. The
client is injected (``redis.asyncio``); this module does no other I/O.
"""

from __future__ import annotations

KEY_PREFIX = "hw:audit:baseline:"


def baseline_key(host: str) -> str:
    """Redis key of *host*'s baseline.

    >>> baseline_key("vm")
    'hw:audit:baseline:vm'
    """
    return KEY_PREFIX + host


class BaselineStore:
    """Load and save per-host baselines with an async Redis client."""

    def __init__(self, client, ttl_seconds: int):
        if ttl_seconds <= 0:
            raise ValueError(f"baseline TTL must be > 0 seconds, got {ttl_seconds!r}")
        self.client = client
        self.ttl = int(ttl_seconds)

    async def load(self, host: str) -> dict:
        """Every stored field of *host*'s baseline (empty for a new host)."""
        return await self.client.hgetall(baseline_key(host))

    async def save(self, deltas: dict[str, tuple[dict, list]]) -> None:
        """For each host, ``(put, gone)``: write changed fields, delete forgotten ones and
        refresh the TTL — every host of a batch in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        queued = False
        for host, (put, gone) in deltas.items():
            if not put and not gone:
                continue
            key = baseline_key(host)
            if gone:
                pipe.hdel(key, *gone)
            if put:
                pipe.hset(key, mapping=put)
            pipe.expire(key, self.ttl)
            queued = True
        if queued:
            await pipe.execute()
