"""Serving's cache of entity states and user attributes for the read path.

Scoring 100 candidates reads ~110 entities from every shard (items, their genres, the
hour, the device, and a handful of the user's own), and the user's attributes. The cache
keeps each entity's state summed over the shards, *raw* (with its decay reference ``t``),
and decays it to each request's time. Exponential decay composes, so a cached state
gives what a fresh read gives, to rounding.

Two modes:

- **Tracked** (serving's default, ``HEADWATER_SERVE_FEATURE_TRACKING``). Redis tells the
  process which keys changed (:mod:`core.redis_tracking`). Every entity and every user's
  attributes stay cached until they change, for at most ``max_age`` seconds.
  - A user's own counters and attributes are read again after every change: their click
    shows in their next request (Redis sends the invalidation beside its answer to the
    worker's write, microseconds apart on one host; :mod:`core.redis_tracking`).
  - A user-independent entity that changed is served for at most ``ttl`` seconds more
    (the TTL mode's bound), then read again. The hot ones (the hour, the device) change
    with nearly every click; reading them after each would cost a round trip per
    request.
  - An entity whose keys were invalidated while its read was in flight serves that
    request and is not kept.
  - A state with a shard newer than the request's time (an event stamped ahead of
    serving's clock) is not kept: it must not be decayed from the read time.
- **TTL** (tracking off or not connected; clusters and TLS). User-independent entities
  only (items, genres, hour, device), for ``ttl`` seconds. A cached state differs from a
  fresh read by at most the clicks of the last ``ttl`` seconds. A user's own counters
  and attributes are always read.

Lifetime: the serving process's memory; nothing survives a restart. A lost invalidation
channel (a Redis restart) or ``FLUSHALL`` empties the cache.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.counters import CounterConfig, decay_shards, decay_state

__all__ = ["Lookup", "ReadCache", "Token"]

#: a tracked read: (the invalidation listener's generation, the cache's change count)
Token = tuple[int, int]

_NONE = np.zeros(0, np.int64)


@dataclass(frozen=True)
class Lookup:
    """One read's references in the cache (:meth:`ReadCache.lookup`): their ``slots``,
    which were ``found`` kept, the raw states of those (``rows``, taken at the look-up:
    a change meanwhile does not alter this read), the distinct slots to read from Redis
    (``miss_slots``, ascending) and their names, and the cache's slot generation then."""

    slots: np.ndarray
    found: np.ndarray
    rows: np.ndarray
    miss: list[str]
    miss_slots: np.ndarray
    generation: int


class ReadCache:
    """Summed (over shards) raw entity states, and user attributes, for serving's reads.

    TTL mode (no tracker): user-independent entities only.

    >>> from features.counters import CounterConfig, CounterSpec
    >>> cfg = CounterConfig(specs=(CounterSpec("user", key=("user_id",)),
    ...                            CounterSpec("item", key=("item_id",))), half_lives=())
    >>> c = ReadCache(cfg, ttl=1.0)
    >>> hit = c.split(["user:1", "item:9"], now=100.0)
    >>> hit.found.tolist(), hit.miss
    ([False, False], ['user:1', 'item:9'])
    >>> shard = np.array([[1.0, 0.0, 99.0], [4.0, 1.0, 99.0]])  # one shard, 2 entities
    >>> c.decayed(hit, [shard], now=100.0).tolist()
    [[1.0, 0.0], [4.0, 1.0]]
    >>> c.split(["user:1", "item:9"], now=100.5).miss  # the item is cached, the user is not
    ['user:1']
    >>> c.split(["item:9"], now=101.5).miss  # expired
    ['item:9']

    Tracked mode: everything, until Redis says a key changed.

    >>> class Live:  # stands for core.redis_tracking.Invalidations
    ...     live, generation = True, 1
    ...     def subscribe(self, callback): self.callback = callback
    >>> c = ReadCache(cfg, ttl=0.0, prefix="hw")
    >>> c.track(Live())
    >>> token = c.begin()
    >>> hit = c.split(["user:1", "item:9"], now=100.0)
    >>> _ = c.decayed(hit, [shard], now=100.0, token=token)
    >>> c.end(token)
    >>> c.split(["user:1", "item:9"], now=130.0).miss
    []
    >>> c.tracker.callback([b"{hw:p0}:user:1"])  # the worker wrote user 1's shard 0
    >>> c.split(["user:1", "item:9"], now=130.0).miss
    ['user:1']
    >>> c.split(["item:9"], now=161.0).miss  # max_age: read again
    ['item:9']
    """

    def __init__(self, config: CounterConfig, ttl: float, max_entities: int = 200_000,
                 prefix: str = "hw", max_age: float = 60.0, clock=time.time) -> None:
        self.config = config
        self.clock = clock  # the time requests are read at (an invalidation's TTL)
        self.ttl = float(ttl)
        self.max_entities = max_entities
        #: tracked entries are read again after this long even if Redis said nothing
        self.max_age = float(max_age)
        self._shared = {s.name for s in config.specs if "user_id" not in s.key}
        # Entity names are numbered (slots) once: a slot's state is row ``slot`` of
        # ``_rows`` (raw, ``t`` last), kept until ``_exp[slot]`` (-inf: not kept), so a
        # request looks its states up with numpy, not per name. ``_order`` lists the kept
        # slots, stored longest ago first.
        self._ids: dict[str, int] = {}
        self._names: list[str] = []
        self._exp = np.full(1024, -np.inf)
        self._rows = np.zeros((1024, config.width + 1))
        self._order: dict[int, None] = {}
        #: bumped when slots are numbered anew (:meth:`prepare`): a slot taken before
        #: names another entity after
        self.generation = 0
        #: names numbered at most, beyond the kept ones, before :meth:`prepare` renumbers
        self.max_names = 2 * max_entities + 4096
        #: tracked user attributes by their Redis key: (expiry, decoded attributes)
        self._users: dict[str, tuple[float, Any]] = {}
        self._user_prefix = f"{prefix}:attrs:user:"
        #: :class:`core.redis_tracking.Invalidations` once :meth:`track` is called
        self.tracker: Any = None
        self._changes = 0  # invalidations seen (a read's token compares it)
        # tracked reads between begin() and end(): their tokens' change counts, in order
        self._open: dict[int, int] = {}  # change count -> reads begun at it
        # names invalidated since the oldest open read began -> the change count then,
        # in change order (a name invalidated again moves to the end)
        self._dropped: dict[str, int] = {}
        #: entity references answered from the cache / read from Redis (tests, metrics)
        self.hits = 0
        self.misses = 0
        #: user attribute reads answered from the cache
        self.user_hits = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 or self.tracker is not None

    def track(self, tracker: Any) -> None:
        """Keep everything until ``tracker`` (an :class:`~core.redis_tracking.Invalidations`)
        says it changed."""
        self.tracker = tracker
        tracker.subscribe(self.invalidate)

    def cacheable(self, entity: str) -> bool:
        return entity.partition(":")[0] in self._shared

    # -- invalidation ---------------------------------------------------------------
    def invalidate(self, keys: list[bytes] | None) -> None:
        """Redis changed ``keys`` (``None``: anything): forget what they hold."""
        self._changes += 1
        if keys is None:
            self._exp[:] = -np.inf
            self._order.clear()
            self._users.clear()
            if self._open:
                self._dropped.pop("*", None)
                self._dropped["*"] = self._changes
            return
        ids, exp, order = self._ids, self._exp, self._order
        for raw in keys:
            key = raw.decode("utf-8", "replace")
            if key[:1] == "{":  # {hw:p<P>}:<entity>: a counter shard
                name = key.partition("}:")[2]
                slot = ids.get(name)
                if slot is None or slot not in order:
                    pass
                elif self.ttl > 0 and self.cacheable(name):
                    # a shared entity may lag a change by the TTL, as without tracking:
                    # the hot ones (the hour, the device) change with every click
                    exp[slot] = min(exp[slot], self.clock() + self.ttl)
                else:
                    exp[slot] = -np.inf
                    del order[slot]
            else:
                name = key
                self._users.pop(name, None)
            if self._open:
                self._dropped.pop(name, None)
                self._dropped[name] = self._changes

    def begin(self) -> Token | None:
        """Before a read's round trip: its token, or None when nothing read now may be
        kept past the TTL (no tracker, or its listener is not subscribed)."""
        tr = self.tracker
        if tr is None or not tr.live:
            return None
        n = self._changes
        self._open[n] = self._open.get(n, 0) + 1
        return tr.generation, n

    def end(self, token: Token | None) -> None:
        """After the round trip of :meth:`begin` (answered or failed)."""
        if token is None:
            return
        n = token[1]
        left = self._open[n] - 1
        if left:
            self._open[n] = left
            return
        del self._open[n]
        if not self._open:
            self._dropped.clear()
            return
        oldest = next(iter(self._open))  # begun in change order: the first is the oldest
        dropped = self._dropped
        while dropped:  # forget what no open read can be older than
            name = next(iter(dropped))
            if dropped[name] > oldest:
                break
            del dropped[name]

    def _kept(self, token: Token | None) -> set[str] | None:
        """The names changed while the read of ``token`` was in flight (keep the rest), or
        None when nothing of it may be kept (not tracked, or the listener changed)."""
        tr = self.tracker
        if token is None or tr is None or not tr.live or tr.generation != token[0]:
            return None
        since = token[1]
        changed = set()
        for name, n in reversed(self._dropped.items()):  # newest first
            if n <= since:
                break
            changed.add(name)
        return None if "*" in changed else changed

    # -- entity states --------------------------------------------------------------
    def prepare(self) -> None:
        """Before a read takes slots: when more than :attr:`max_names` names are numbered,
        number the kept ones anew (the others are forgotten) and bump :attr:`generation`."""
        if len(self._names) <= self.max_names:
            return
        kept = list(self._order)
        names = [self._names[k] for k in kept]
        self._ids = {e: k for k, e in enumerate(names)}
        self._names = names
        self._rows[: len(kept)] = self._rows[kept]
        self._exp[: len(kept)] = self._exp[kept]
        self._exp[len(kept):] = -np.inf
        self._order = dict.fromkeys(range(len(kept)))
        self.generation += 1

    def slot(self, name: str) -> int:
        """Entity ``name``'s slot (numbered on first sight)."""
        got = self._ids.get(name)
        if got is None:
            got = self._ids[name] = len(self._names)
            self._names.append(name)
            if got >= len(self._exp):
                self._exp = np.concatenate([self._exp, np.full(len(self._exp), -np.inf)])
                self._rows = np.vstack([self._rows, np.zeros_like(self._rows)])
        return got

    def names_of(self, slots: np.ndarray) -> list[str]:
        """The entity names of ``slots`` (taken since the last :meth:`prepare`)."""
        return [*map(self._names.__getitem__, slots.tolist())]

    def lookup(self, slots: np.ndarray, now: float) -> Lookup:
        """Which references ``slots`` (one read's) are kept and valid at ``now``, their raw
        states (taken now), and the distinct entities to read."""
        found = self._exp[slots] > now
        n_found = int(found.sum())
        self.hits += n_found
        self.misses += len(slots) - n_found
        if n_found == len(slots):  # all in memory (the common case)
            return Lookup(slots, found, self._rows[slots], [], _NONE, self.generation)
        miss_slots = np.unique(slots[~found])
        return Lookup(slots, found, self._rows[slots[found]], self.names_of(miss_slots),
                      miss_slots, self.generation)

    def decayed(self, look: Lookup, shards: Sequence[np.ndarray], now: float,
                token: Token | None = None) -> np.ndarray:
        """Decayed states ``[len(look.slots), width]`` summed over shards: the kept ones from
        ``look``, the missed ones from ``shards`` (:meth:`lookup`'s ``miss`` read from
        every shard), which are kept (all of them if ``token`` is a tracked read that may
        be kept, else the shared ones for ``ttl``)."""
        cfg = self.config
        if not look.miss:
            return decay_state(cfg, look.rows, now)
        out = np.empty((len(look.slots), cfg.width))
        out[look.found] = decay_state(cfg, look.rows, now)
        fresh = decay_shards(cfg, shards, now)
        missed = ~look.found
        out[missed] = fresh[np.searchsorted(look.miss_slots, look.slots[missed])]
        if look.generation == self.generation:  # else the slots were numbered anew meanwhile
            # a shard stamped after ``now`` is not decayed to ``now``: such a sum must
            # not be decayed again from ``now`` later
            t = np.stack([s[:, cfg.width] for s in shards]) if len(shards) else None
            ahead = (t > now).any(axis=0) if t is not None else np.zeros(len(look.miss), bool)
            self._remember(look.miss_slots, fresh, now, ahead, self._kept(token))
        return out

    def split(self, entities: Sequence[str], now: float) -> Lookup:
        """:meth:`lookup` of entity names (the store reads by slot; tools and tests name
        entities)."""
        self.prepare()
        return self.lookup(np.fromiter(map(self.slot, entities), np.int64, len(entities)), now)

    def cached(self) -> list[str]:
        """The entities kept now, stored longest ago first (tests and the CLI read it)."""
        return [self._names[k] for k in self._order]

    def _store(self, slot: int, expires: float, row: np.ndarray) -> None:
        self._exp[slot] = expires
        self._rows[slot] = row
        self._order.pop(slot, None)
        self._order[slot] = None

    def _remember(self, slots: np.ndarray, decayed: np.ndarray, now: float,
                  ahead: np.ndarray, dropped: set[str] | None) -> None:
        if len(self._order) > self.max_entities:
            self._exp[_forget_oldest_half(self._order)] = -np.inf
        # stored decayed to ``now`` with reference ``t = now``: decaying it again to a
        # later time gives the same as decaying the raw shard states (exponential decay)
        rows = np.hstack([decayed, np.full((len(slots), 1), now)])
        names = self._names
        if dropped is not None:  # tracked: every entity not changed meanwhile
            expires = now + self.max_age
            for k, s in enumerate(slots.tolist()):
                if ahead[k]:
                    continue
                e = names[s]
                if e not in dropped:
                    self._store(s, expires, rows[k])
                elif self.ttl > 0 and self.cacheable(e):  # changed: shared ones for the TTL
                    self._store(s, now + self.ttl, rows[k])
        elif self.ttl > 0:
            expires = now + self.ttl
            for k, s in enumerate(slots.tolist()):
                if not ahead[k] and self.cacheable(names[s]):
                    self._store(s, expires, rows[k])

    # -- user attributes ------------------------------------------------------------
    def user(self, key: str, now: float) -> tuple[bool, Any]:
        """``(True, attributes)`` for a tracked user's attributes still valid (decoded; shared:
        the caller copies before handing them out), else ``(False, None)``."""
        got = self._users.get(key)
        if got is not None and got[0] > now:
            self.user_hits += 1
            return True, got[1]
        return False, None

    def remember_users(self, replies: dict[str, Any], now: float, token: Token | None) -> None:
        """Keep the users' attributes of a tracked read (by key, decoded)."""
        dropped = self._kept(token)
        if dropped is None:
            return
        if len(self._users) > self.max_entities:
            _forget_oldest_half(self._users)
        expires = now + self.max_age
        for key, reply in replies.items():
            if key not in dropped:
                self._users[key] = (expires, reply)

    def stats(self) -> dict[str, Any]:
        tr = self.tracker
        return {"entities": len(self._order), "hits": self.hits, "misses": self.misses,
                "users": len(self._users), "user_hits": self.user_hits,
                "tracking": None if tr is None else (
                    "refused" if getattr(tr, "error", None) else "live" if tr.live else "connecting"),
                "invalidations": self._changes}


def _forget_oldest_half(entries: dict) -> list:
    """Make room: drop the half stored longest ago (a dict keeps insertion order), so the
    entities every request needs are read again once, not all at once. Returns the keys
    dropped.

    >>> d = {k: None for k in "abcde"}
    >>> _forget_oldest_half(d)
    ['a', 'b']
    >>> list(d)
    ['c', 'd', 'e']
    """
    dropped = list(itertools.islice(entries, len(entries) // 2))
    for key in dropped:
        del entries[key]
    return dropped
