"""Fixtures for the features tests: online stores on the session's real redis-server."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from features.counters import CounterConfig
from features.movielens import MovieLens, load_movielens
from features.store import SyncOnlineStore


@pytest.fixture(scope="session")
def ml(data_dir) -> MovieLens:
    return load_movielens(data_dir)


@pytest.fixture
def make_store(redis_db) -> Iterator:
    """Factory of sync stores on a flushed database; closed at teardown."""
    made: list[SyncOnlineStore] = []

    def make(partitions: int = 1, counters: CounterConfig | None = None, **kw) -> SyncOnlineStore:
        s = SyncOnlineStore.from_url(redis_db, partitions=partitions, counters=counters, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def dump_state(redis_db) -> Iterator:
    """A function returning every hash as {key: {field: value}}, replay cache excluded.

    Also excluded: each shard's writer token (``{hw:pP}:writer``, a random name of the
    shard's version, different in every run by design), and heartbeats (``hw:status*``:
    the streams package's worker process, on the same Redis, may still be beating while
    another package's tests run beside it under xdist)."""
    import redis

    client = redis.Redis.from_url(redis_db)

    def dump(pattern: str = "*", skip: tuple[str, ...] = (":pit:", ":writer", "hw:status")) -> dict:
        out = {}
        for key in client.scan_iter(match=pattern, count=1000):
            k = key.decode()
            if not any(s in k for s in skip):
                # Histories (features/asof.py) are strings beside the hashes.
                out[k] = client.get(key) if client.type(key) == b"string" else client.hgetall(key)
        return out

    yield dump
    client.close()


class ReferenceCounters:
    """A deliberately plain per-event Python model of the counters to test the Lua against.

    Entity states as dicts; ``apply`` returns the pre-event states of an event's entities."""

    def __init__(self, half_lives):
        self.half_lives = list(half_lives)
        self.state: dict[str, dict] = {}
        self.applied: set[tuple[int, int]] = set()

    def _get(self, entity):
        return self.state.setdefault(
            entity,
            {
                "n": 0.0,
                "c": 0.0,
                "dn": [0.0] * len(self.half_lives),
                "dc": [0.0] * len(self.half_lives),
                "t": None,
            },
        )

    def apply(self, entities, ts, label):
        pre = []
        for e in entities:
            s = self._get(e)
            t = ts if s["t"] is None else s["t"]
            if ts >= t:
                for j, h in enumerate(self.half_lives):
                    f = math.pow(2.0, -(ts - t) / h)
                    s["dn"][j] *= f
                    s["dc"][j] *= f
                pre.append(self.vector(s))
                for j in range(len(self.half_lives)):
                    s["dn"][j] += 1.0
                    s["dc"][j] += label
                s["t"] = ts
            else:
                pre.append(self.vector(s))
                for j, h in enumerate(self.half_lives):
                    w = math.pow(2.0, -(t - ts) / h)
                    s["dn"][j] += w
                    s["dc"][j] += label * w
            s["n"] += 1
            s["c"] += label
        return pre

    @staticmethod
    def vector(s):
        out = [s["n"], s["c"]]
        for a, b in zip(s["dn"], s["dc"], strict=True):
            out += [a, b]
        return out


class StrictReference:
    """Brute-force point in time: every contribution ever applied, per entity, with its
    event time; a row's pre-event state sums those strictly older than it (``ties``: or
    at its time), from any partition, each decayed to the row's time."""

    def __init__(self, half_lives, ties=False):
        self.half_lives = list(half_lives)
        self.ties = ties
        self.log: dict[str, list[tuple[float, int]]] = {}

    def pre(self, entity, ts):
        out = [0.0, 0.0] + [0.0] * (2 * len(self.half_lives))
        for t, label in self.log.get(entity, []):
            if t < ts or (self.ties and t == ts):
                out[0] += 1
                out[1] += label
                for j, h in enumerate(self.half_lives):
                    w = math.pow(2.0, -(ts - t) / h)
                    out[2 + 2 * j] += w
                    out[3 + 2 * j] += label * w
        return out

    def apply(self, entities, ts, label):
        """Pre-event states of one event's entities, then record it."""
        pre = [self.pre(e, ts) for e in entities]
        for e in entities:
            self.log.setdefault(e, []).append((ts, label))
        return pre


@pytest.fixture
def strict_reference():
    """The :class:`StrictReference` class."""
    return StrictReference


@pytest.fixture
def reference_counters():
    """The :class:`ReferenceCounters` class (fixtures, not imports: importlib mode)."""
    return ReferenceCounters
