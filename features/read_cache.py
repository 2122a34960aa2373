"""A short-lived cache of entity states for the serving read path.

Scoring 100 candidates reads ~110 entities from every shard (items, their genres, the
hour, the device, and a handful of the user's own): the Lua read of the item-side ones
is most of Redis' time per request. Those entities are shared by every user, so
serving keeps their summed shard states for ``ttl`` seconds and reads only what is
missing. States are cached *raw* (with their decay reference ``t``) and decayed to each
request's time, so a cached state differs from a fresh read only by the clicks of the
last ``ttl`` seconds. Entities keyed by the user (``user``, ``user_genre``) are never
cached: a user's own last click always shows in their next request.

Lifetime: the serving process's memory; nothing survives a restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from features.counters import CounterConfig, decay_shards, decay_state

__all__ = ["ReadCache"]


class ReadCache:
    """Summed (over shards) raw states of user-independent entities, for ``ttl`` seconds.

    >>> from features.counters import CounterConfig, CounterSpec
    >>> cfg = CounterConfig(specs=(CounterSpec("user", key=("user_id",)),
    ...                            CounterSpec("item", key=("item_id",))), half_lives=())
    >>> c = ReadCache(cfg, ttl=1.0)
    >>> hit, miss = c.split(["user:1", "item:9"], now=100.0)
    >>> hit, miss
    ({}, ['user:1', 'item:9'])
    >>> shard = np.array([[1.0, 0.0, 99.0], [4.0, 1.0, 99.0]])  # one shard, 2 entities
    >>> c.merge(["user:1", "item:9"], hit, miss, [shard], now=100.0).tolist()
    [[1.0, 0.0], [4.0, 1.0]]
    >>> c.split(["user:1", "item:9"], now=100.5)[1]  # the item is cached, the user is not
    ['user:1']
    >>> c.split(["item:9"], now=101.5)[1]  # expired
    ['item:9']
    """

    def __init__(self, config: CounterConfig, ttl: float, max_entities: int = 200_000) -> None:
        self.config = config
        self.ttl = float(ttl)
        self.max_entities = max_entities
        self._shared = {s.name for s in config.specs if "user_id" not in s.key}
        self._states: dict[str, tuple[float, np.ndarray]] = {}
        #: entity reads answered from the cache / from Redis (for tests and metrics)
        self.hits = 0
        self.misses = 0

    def cacheable(self, entity: str) -> bool:
        return entity.partition(":")[0] in self._shared

    def split(self, entities: Sequence[str], now: float) -> tuple[dict[int, np.ndarray], list[str]]:
        """``({index: raw state}, entities to read)`` for the entities of one request."""
        hit: dict[int, np.ndarray] = {}
        miss: list[str] = []
        states = self._states
        for k, e in enumerate(entities):
            got = states.get(e)
            if got is not None and got[0] > now:
                hit[k] = got[1]
            else:
                miss.append(e)
        self.hits += len(hit)
        self.misses += len(miss)
        return hit, miss

    def merge(
        self,
        entities: Sequence[str],
        hit: dict[int, np.ndarray],
        miss: Sequence[str],
        shards: Sequence[np.ndarray],
        now: float,
    ) -> np.ndarray:
        """Decayed states ``[len(entities), width]`` summed over shards; caches the misses."""
        cfg = self.config
        out = np.zeros((len(entities), cfg.width))
        if hit:
            idx = np.fromiter(hit.keys(), dtype=np.int64, count=len(hit))
            out[idx] = decay_state(cfg, np.vstack(list(hit.values())), now)
        if miss:
            fresh = decay_shards(cfg, shards, now)
            pos = {e: k for k, e in enumerate(entities)} if hit else None
            miss_idx = (
                np.arange(len(entities)) if pos is None
                else np.fromiter((pos[e] for e in miss), dtype=np.int64, count=len(miss))
            )
            out[miss_idx] = fresh
            self._remember(miss, fresh, now)
        return out

    def _remember(self, miss: Sequence[str], decayed: np.ndarray, now: float) -> None:
        if len(self._states) > self.max_entities:
            self._states.clear()
        expires = now + self.ttl
        # stored decayed to ``now`` with reference ``t = now``: decaying it again to a
        # later time gives the same as decaying the raw shard states (exponential decay)
        t = np.full((len(miss), 1), now)
        rows = np.hstack([decayed, t])
        for k, e in enumerate(miss):
            if self.cacheable(e):
                self._states[e] = (expires, rows[k])

    def stats(self) -> dict[str, Any]:
        return {"entities": len(self._states), "hits": self.hits, "misses": self.misses}
