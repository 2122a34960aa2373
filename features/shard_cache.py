"""Entity states of shards as this process last saw or wrote them, tagged by shard version.

Every batch needs the states of its entities in every partition's shard. Most of them
were written (own shard) or read (other shards) by this process a batch ago, so
:func:`features.store_apply.plan_apply` asks Redis only for entities not cached here,
plus the shard's **version**: the pair (writer token, next offset of the topic).

- ``apply.lua`` sets a fresh random writer token (``{hw:p<P>}:writer``) on every write,
  in the same script that writes the states and moves the next offset, so a version
  names one exact state of the shard. An older worker that does not set the token still
  moves the next offset, so the pair changes on every write by anyone.
- A cached state is used only if the version it is tagged with equals the version the
  read script returned *in the same round trip* as the uncached entities: then the
  cached and the fresh states are one consistent snapshot, exactly what reading every
  key would have returned. Otherwise the plan reads the whole shard again.
- Redis losing writes (a restart inside the fsync window, a restore) brings back an
  older token: the versions differ and the cache is not used. A lost reply to a write
  leaves the cache at the older version: not used either.

The cache never changes a result, only which keys are read. Bounded per shard
(``max_entities``; a full shard is cleared and refilled).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["ShardCache", "Snapshot"]

Version = tuple[bytes, bytes]


class Snapshot:
    """What the cache held for one shard and a list of entities when a read was sent."""

    __slots__ = ("version", "pos", "rows")

    def __init__(self, version: Version | None, pos: np.ndarray, rows: np.ndarray) -> None:
        self.version = version
        self.pos = pos  # per entity, its cache row, or -1 when not cached (must be read)
        self.rows = rows  # copies of the cached rows, in entity order of pos >= 0

    @property
    def missing(self) -> np.ndarray:
        return np.flatnonzero(self.pos < 0)


class _Shard:
    __slots__ = ("version", "index", "table")

    def __init__(self, version: Version, width: int) -> None:
        self.version = version
        self.index: dict[str, int] = {}
        self.table = np.zeros((64, width))


class ShardCache:
    """Per shard: entity → state row (``width`` values, ``t`` last), valid at one version."""

    def __init__(self, width: int, max_entities: int = 250_000) -> None:
        self.width = width
        self.max_entities = max_entities
        self._shards: dict[int, _Shard] = {}

    def _positions(self, shard: _Shard | None, entities: Sequence[str]) -> np.ndarray:
        if shard is None or not shard.index:
            return np.full(len(entities), -1, np.int64)
        get = shard.index.get
        return np.fromiter(map(get, entities, itertools.repeat(-1)), np.int64, len(entities))

    def snapshot(
        self, q: int, entities: Sequence[str], min_t: np.ndarray | None = None
    ) -> Snapshot:
        """The cached rows of ``entities`` in shard ``q`` (copied) and its version.

        Rows whose ``t`` is not older than their entity's ``min_t`` count as not cached
        (the caller needs what only a read returns with them: their histories,
        features/asof.py)."""
        shard = self._shards.get(q) if self.max_entities > 0 else None
        pos = self._positions(shard, entities)
        if shard is not None and min_t is not None and (pos >= 0).any():
            have = np.flatnonzero(pos >= 0)
            recent = shard.table[pos[have], self.width - 1] >= np.asarray(min_t)[have]
            pos[have[recent]] = -1
        if shard is None:
            return Snapshot(None, pos, np.zeros((0, self.width)))
        return Snapshot(shard.version, pos, shard.table[pos[pos >= 0]])

    def assemble(
        self, q: int, entities: Sequence[str], snap: Snapshot, version: Version, fresh: np.ndarray
    ) -> np.ndarray | None:
        """Every entity's state in shard ``q`` at ``version``, or None: read them all.

        ``fresh`` holds the states read at ``version`` for ``snap.missing``. Cached rows
        count only when tagged with that same version (as snapshotted, or as cached now).
        """
        states = np.empty((len(entities), self.width))
        miss = snap.pos < 0
        states[miss] = fresh
        if not miss.all():
            if snap.version == version:
                states[~miss] = snap.rows
            else:
                shard = self._shards.get(q)
                if shard is None or shard.version != version:
                    return None
                have = np.flatnonzero(~miss)
                pos = self._positions(shard, [entities[k] for k in have.tolist()])
                if (pos < 0).any():
                    return None
                states[have] = shard.table[pos]
        self.put(q, version, entities, states)
        return states

    def put(self, q: int, version: Version, entities: Sequence[str], states: np.ndarray) -> None:
        """Remember ``states`` of ``entities`` in shard ``q`` as of ``version``."""
        if self.max_entities <= 0 or not len(entities):
            return
        shard = self._shards.get(q)
        if shard is None or shard.version != version:
            shard = self._shards[q] = _Shard(version, self.width)
        pos = self._positions(shard, entities)
        new = np.flatnonzero(pos < 0)
        if len(new):
            if len(shard.index) + len(new) > self.max_entities:
                shard = self._shards[q] = _Shard(version, self.width)
                pos = np.full(len(entities), -1, np.int64)
                new = np.arange(len(entities))
            start = len(shard.index)
            names = [entities[k] for k in new.tolist()]
            fresh = dict(zip(names, itertools.count(start)))
            if len(fresh) != len(names):
                raise ValueError("ShardCache.put: duplicate entities")
            shard.index.update(fresh)
            pos[new] = np.arange(start, start + len(new))
            need = start + len(new)
            if need > len(shard.table):
                grown = np.zeros((max(need, 2 * len(shard.table)), self.width))
                grown[:start] = shard.table[:start]
                shard.table = grown
        shard.table[pos] = states

    def forget(self, q: int | None = None) -> None:
        """Drop shard ``q`` (all shards when None)."""
        if q is None:
            self._shards.clear()
        else:
            self._shards.pop(q, None)
