"""The online store's shared core: keys, Lua scripts, the entity-state and item-attribute
caches, and the result type; the read and write planners (:mod:`features.store_apply`,
:mod:`features.store_reads`) and the stores (:mod:`features.store`) build on it.

Import order is one way: ``store_core`` <- ``store_apply``, ``store_reads`` <- ``store``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import json
import math
import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from features.counters import CounterConfig, RequestSlots
from features.hashing import canonical
from features.read_cache import ReadCache
from features.shard_cache import ShardCache

__all__ = ["APPLY", "PUT", "READ", "READ_OWN", "READ_SHARD", "SCRIPTS", "SCRIPT_KEYS",
           "BatchResult", "Command", "Plan", "StoreCore", "decode_hash", "latest_user_attrs"]

Command = tuple[Any, ...]
Plan = Generator[list[Command], list[Any], Any]


def script(name: str) -> tuple[str, str]:
    text = (importlib.resources.files("features") / "lua" / name).read_text(encoding="utf-8")
    return text, hashlib.sha1(text.encode()).hexdigest()


APPLY, READ, PUT = script("apply.lua"), script("read.lua"), script("put_attrs.lua")
READ_OWN, READ_SHARD = script("read_own.lua"), script("read_shard.lua")
HGETALL_MANY = script("hgetall_many.lua")
SCRIPTS = (APPLY, READ, PUT, READ_OWN, READ_SHARD, HGETALL_MANY)

#: Keys per call of a read script (read.lua, hgetall_many.lua); a longer read is several
#: calls, pipelined, whose replies join into the one call's. Redis before 7.2 (Debian 12
#: ships 7.0) remembers, for a connection with CLIENT TRACKING on (serving's), *every*
#: key a script declares again for each read command the script runs: a read of n keys
#: costs n^2 (redis/redis#11770 moved it to the command's own keys). Measured on 7.0.15:
#: 3,520 item keys in one call 753 ms of Redis's core, in calls of 32 keys 15 ms; without
#: tracking (what 7.2 does) 9.1 against 10.0 ms (docs/decisions.md, "Read scripts of at
#: most 32 keys").
SCRIPT_KEYS = 32


@dataclass
class BatchResult:
    """What :meth:`OnlineStore.apply_batch` returns; arrays follow the input event order.

    ``features`` holds the pre-event counter features (``CounterConfig.feature_names``).
    ``valid`` is False only for an event applied in an earlier run whose pre-event
    state is no longer in the replay cache: build no row from it. ``replayed`` marks
    events applied before (their counters did not move again).
    """

    features: dict[str, np.ndarray]
    valid: np.ndarray
    replayed: np.ndarray
    late: np.ndarray
    late_count: int
    duplicate_count: int
    next_offset: int
    item_attrs: dict[str, dict] = field(default_factory=dict)
    codes: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    #: per event, the items of the user's recent clicks before it, oldest first
    #: (:mod:`features.sequence`); ``None`` when the store keeps none (``seq_len`` 0)
    sequences: list[tuple[str, ...]] | None = None


def decode_hash(raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    return {k.decode(): json.loads(v) for k, v in raw.items() if k != b"_ts"}


def latest_user_attrs(cols: Mapping[str, Any]) -> dict[str, tuple[float, dict]]:
    """Per user (first-seen order), the attributes of its newest event (ties: the later).

    Events without a user id or attributes do not count. Vectorised over events; the
    per-event loop is the reference and runs when an event time is not finite.
    """
    uids, users, ts = cols["user_id"], cols["user"], np.asarray(cols["ts"], np.float64)
    n = len(ts)
    ok = np.fromiter(map(bool, users), bool, n) & np.fromiter(map(bool, uids), bool, n)
    idx = np.flatnonzero(ok)
    if not len(idx):
        return {}
    if not np.isfinite(ts[idx]).all() or not isinstance(uids, np.ndarray):
        latest: dict[str, tuple[float, dict]] = {}
        for uid, t, attrs in zip(uids, ts.tolist(), users, strict=True):
            if uid and attrs and (uid not in latest or t >= latest[uid][0]):
                latest[uid] = (t, attrs)
        return latest
    ids = uids[idx]
    index = dict(zip(dict.fromkeys(ids.tolist()), itertools.count()))
    codes = np.fromiter(map(index.__getitem__, ids.tolist()), np.int64, len(idx))
    order = np.lexsort((idx, ts[idx], codes))  # by user, then time, then position
    last = order[np.flatnonzero(np.append(codes[order][1:] != codes[order][:-1], True))]
    winners = idx[last].tolist()  # user k's newest event, users in first-seen order
    return {uid: (float(ts[w]), users[w]) for uid, w in zip(index, winners, strict=True)}


class StoreCore:
    """Keys, plans and metrics shared by the async and sync stores."""

    def __init__(
        self,
        *,
        partitions: int,
        counters: CounterConfig | None = None,
        registry: CollectorRegistry | None = None,
        prefix: str = "hw",
        attr_cache_seconds: float = 30.0,
        replay_batches: int = 8,
        miss_cache_seconds: float = 1.0,
        shard_cache_entities: int = 250_000,
        read_cache_seconds: float = 0.0,
        pit_ties: bool = False,
        pit_history: int = 32,
        seq_len: int = 0,
        clock=time.time,
    ) -> None:
        if partitions < 1:
            raise ValueError(
                f"partitions must be >= 1 (the source topic's count), got {partitions}"
            )
        self.partitions = partitions
        self.counters = counters or CounterConfig()
        if seq_len < 0:
            raise ValueError(f"seq_len must be >= 0, got {seq_len}")
        #: recent clicks per user in rows and reads (features/sequence.py); 0 = none kept
        self.seq_len = seq_len
        self.prefix = prefix
        self.attr_cache_seconds = attr_cache_seconds
        self.replay_batches = replay_batches
        if pit_history < 0:
            raise ValueError(f"pit_history must be >= 0 (entries kept per entity), got {pit_history}")
        #: Pre-event features include contributions at exactly the event's time too.
        self.pit_ties = bool(pit_ties)
        #: Latest events each entity keeps per shard for strict point-in-time reads.
        self.pit_history = int(pit_history)
        self.clock = clock
        self.round_trips = 0
        self.commands = 0
        #: each item's references with the read cache's entity slots, for every read
        #: (through the cache or not), per list of counters read; this process only
        self.request_slots = RequestSlots(self.counters)
        self._slots_by_specs: dict[tuple, RequestSlots] = {}  # lists a read names
        self.miss_cache_seconds = miss_cache_seconds
        #: the client is a Redis Cluster's (set by the store): multi-key scripts only per slot
        self.cluster = False
        # Entity states as last read or written, per shard and shard version: a batch
        # reads only the entities not cached (features/shard_cache.py).
        self.shard_cache = ShardCache(self.counters.width + 1, shard_cache_entities)
        # Serving's reads of user-independent entities, kept this long (0: off), or of
        # everything while Redis tracks them (OnlineStore with a tracking transport).
        self.read_cache_seconds = read_cache_seconds
        self.read_cache = ReadCache(self.counters, read_cache_seconds, prefix=prefix,
                                    clock=clock)
        self._items: dict[str, tuple[float, dict, dict]] = {}
        self._absent: dict[str, float] = {}  # item id -> when to ask Redis again
        # item ids by the (grid-aligned) time their cached answer expires: a request that
        # must ask Redis anyway re-asks every item due by then (see items_miss)
        self._due: dict[float, set[str]] = {}
        self._wanted: dict[str, float] = {}  # item -> when a read last wanted it
        #: items asked for per Redis call at most (a refresh of the whole cache is split)
        self.items_per_call = 4096
        self.items_found = 0.0  # see items_take
        self._users: dict[str, str] = {}
        # A private registry by default: two stores in one process must not collide on the
        # global one; the worker injects the registry it exports.
        registry = registry if registry is not None else CollectorRegistry()
        self.late_events = Counter(
            "headwater_features_late_events_total",
            "Click events older than an entity's counters (applied exactly, t not moved back).",
            ["topic"],
            registry=registry,
        )
        self.duplicate_events = Counter(
            "headwater_features_duplicate_events_total",
            "Click events skipped because their offset was already applied.",
            ["topic"],
            registry=registry,
        )
        self.truncated_events = Counter(
            "headwater_features_pit_truncated_total",
            "Event references older than an entity's retained history in a shard: that "
            "shard's older part was left out (never the future; see docs/point-in-time.md).",
            ["topic"],
            registry=registry,
        )
        self.fenced_writes = Counter(
            "headwater_features_fenced_writes_total",
            "Batch writes refused because the partition's next offset moved (another writer).",
            ["topic"],
            registry=registry,
        )
        self._seconds = Histogram(
            "headwater_redis_seconds",
            "Wall time of one online-store operation, round trips included.",
            ["operation"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )

    # -- keys -------------------------------------------------------------------------
    def shard_key(self, partition: int, entity: str) -> str:
        """``{hw:p<P>}:<entity>``: the entity's counter hash in one partition's shard."""
        return f"{{{self.prefix}:p{partition}}}:{entity}"

    def history_key(self, partition: int, entity: str) -> str:
        """``{hw:p<P>}:~h2:<entity>``: the entity's point-in-time history in one shard
        (:mod:`features.asof`; ``~`` cannot start a counter name). ``h2``: entries of
        ``(ts, impressions, clicks)``; the ``~h:`` keys of the older ``(ts, label)`` format
        are never read (an entity without an ``h2`` history starts one from its state)."""
        return f"{{{self.prefix}:p{partition}}}:~h2:{entity}"

    def attrs_key(self, kind: str, entity_id: Any) -> str:
        return f"{self.prefix}:attrs:{kind}:{canonical(entity_id)}"

    def codes_key(self, item_id: Any) -> str:
        return f"{self.prefix}:codes:item:{canonical(item_id)}"

    def evalsha(
        self, script: tuple[str, str], keys: Sequence[str], args: Sequence[Any]
    ) -> Command:
        return ("EVALSHA", script[1], len(keys), *keys, *args)

    def read_cmds(self, entities: Sequence[str], fields: list[str]) -> list[Command]:
        """The read of ``entities`` in every shard: script calls of at most
        :data:`SCRIPT_KEYS` keys over all shards on one server, one call per shard on a
        cluster (a script's keys must share a slot there). :meth:`shard_states` splits
        the replies per shard either way."""
        if not entities:
            return []
        if not self.cluster:
            keys = [self.shard_key(p, e) for p in range(self.partitions) for e in entities]
            return [self.evalsha(READ, keys[i:i + SCRIPT_KEYS], fields)
                    for i in range(0, len(keys), SCRIPT_KEYS)]
        return [
            self.evalsha(READ, [self.shard_key(p, e) for e in entities], fields)
            for p in range(self.partitions)
        ]

    def shard_states(self, blobs: Sequence[bytes], width: int) -> list[np.ndarray]:
        """The replies of :meth:`read_cmds` as one ``[entities, width + 1]`` array per shard."""
        if self.cluster or not blobs:
            return [self.states(b, width) for b in blobs]
        blob = blobs[0] if len(blobs) == 1 else b"".join(blobs)
        return list(self.states(blob, width).reshape(self.partitions, -1, width + 1))

    def states(self, blob: bytes, width: int) -> np.ndarray:
        return np.frombuffer(blob, dtype="<f8").reshape(-1, width + 1)

    def slots_for(self, config: CounterConfig) -> RequestSlots:
        """The :class:`RequestSlots` of a list of counters (all of them, or those a read
        names), made on first use; a handful of lists is kept."""
        if config is self.counters:  # every read that does not name its features
            return self.request_slots
        got = self._slots_by_specs.get(config.specs)
        if got is None:
            if len(self._slots_by_specs) > 64:  # lists come from few callers' feature lists
                self._slots_by_specs = {}
            got = self._slots_by_specs[config.specs] = RequestSlots(config)
        return got

    # -- item attributes and codes, with a short-lived cache ---------------------------
    def plan_items(self, item_ids: Iterable[str]) -> Plan:
        now = self.clock()
        want = {i for i in item_ids if i}
        miss = self.items_miss(want, now)
        if miss:
            res = yield self.items_cmds(miss)
            self.items_take(miss, res, now)
        return self.items_out(want)

    def items_miss(self, want: set[str], now: float) -> list[str]:
        """Items to ask Redis about: the wanted ones not cached (or expired) and not
        recently absent, and, when there are any, every other cached item due within
        one expiry step (:meth:`_expiry`) that a read wanted within twice
        ``attr_cache_seconds`` (an item nobody asks for any more is left to expire, not
        re-read forever).

        Answers are cached at most ``attr_cache_seconds`` (absent items
        ``miss_cache_seconds``), as before; what changes is *when* they are re-read.
        Per-item expiry spread the re-reads over every request (with a catalogue of
        1,600 items and 100 candidates, almost every request found one expired item
        and paid a second round trip); expiries on a grid, and re-reading every entry
        due by the next grid point together, make it one extra round trip per grid
        step at most, and never keep an answer longer.
        """
        items, absent = self._items, self._absent
        self._wanted.update(dict.fromkeys(want, now))
        miss = [
            i for i in want if (i not in items or items[i][0] < now) and absent.get(i, 0) < now
        ]
        if not miss or not self._due:
            return miss
        step = min(self.attr_cache_seconds, self.miss_cache_seconds) / 4
        extra: set[str] = set()
        room = self.items_per_call - len(miss)
        for t in sorted(self._due):
            if t > now + step or len(extra) >= room:
                break
            extra |= self._due.pop(t)
        extra.difference_update(miss)
        wanted, since = self._wanted, now - 2 * self.attr_cache_seconds
        keep = []
        for i in sorted(extra):
            if wanted.get(i, -math.inf) >= since:
                keep.append(i)
            else:
                wanted.pop(i, None)
        return miss + keep[: max(room, 0)]

    def _expiry(self, now: float, ttl: float) -> float:
        """``now + ttl`` rounded down to a quarter of ``ttl``: answers read close together
        expire together, each after between 3/4 and all of ``ttl``."""
        if ttl <= 0:
            return now + ttl
        step = ttl / 4
        return math.floor((now + ttl) / step) * step

    def items_cmds(self, miss: list[str]) -> list[Command]:
        """Each item's attributes and codes: script calls of at most :data:`SCRIPT_KEYS`
        keys on one server (per command a client packs and parses costs more than the
        HGETALL), HGETALLs on a cluster (the keys lie in many slots)."""
        keys: list[str] = []
        for i in miss:
            keys += [self.attrs_key("item", i), self.codes_key(i)]
        if self.cluster or not keys:
            return [("HGETALL", k) for k in keys]
        return [self.evalsha(HGETALL_MANY, keys[i:i + SCRIPT_KEYS], [])
                for i in range(0, len(keys), SCRIPT_KEYS)]

    def items_take(self, miss: list[str], res: list[Any], now: float) -> None:
        """Cache the replies of :meth:`items_cmds` (two per item: its HGETALLs, or the
        scripts' flat lists)."""
        if miss and not self.cluster:  # the scripts' flat lists, call after call
            res = [dict(zip(r[0::2], r[1::2], strict=True)) for part in res for r in part]
        if len(self._items) > 200_000 or len(self._absent) > 200_000:
            self._items.clear()
            self._absent.clear()
            self._due.clear()
            self._wanted.clear()
        found = 0
        keep = self._expiry(now, self.attr_cache_seconds)
        gone = self._expiry(now, self.miss_cache_seconds)
        for k, i in enumerate(miss):
            attrs, codes = decode_hash(res[2 * k]), decode_hash(res[2 * k + 1])
            found += bool(attrs)
            if not (attrs or codes):
                # Remembered only briefly: the item event may be in flight. Without
                # this, a stream of unknown items costs two commands per item per batch.
                self._absent[i] = gone
                self._items.pop(i, None)
                self._due.setdefault(gone, set()).add(i)
            else:
                self._items[i] = (keep, attrs, codes.get("codes") or {})
                self._absent.pop(i, None)
                self._due.setdefault(keep, set()).add(i)
        if miss:  # share of items asked about that had attributes, smoothed over batches
            self.items_found += 0.3 * (found / len(miss) - self.items_found)

    def items_out(self, want: set[str]) -> tuple[dict[str, dict], dict[str, dict]]:
        attrs_out: dict[str, dict] = {}
        codes_out: dict[str, dict] = {}
        get = self._items.get
        for i in want:  # one look-up per item
            got = get(i)
            if got is not None:
                attrs_out[i] = got[1]
                if got[2]:
                    codes_out[i] = got[2]
        return attrs_out, codes_out

    def user_attr_cmds(self, cols: Mapping[str, Any]) -> list[Command]:
        latest = latest_user_attrs(cols)
        cmds = []
        for uid, (ts, attrs) in latest.items():
            payload = json.dumps(attrs, sort_keys=True, default=str)
            if self._users.get(uid) == payload:
                continue  # unchanged since we last wrote it: save the command
            self._users[uid] = payload
            args: list[Any] = [repr(ts)]
            for k, v in attrs.items():
                args += [k, json.dumps(v, default=str)]
            cmds.append(self.evalsha(PUT, [self.attrs_key("user", uid)], args))
        if len(self._users) > 500_000:
            self._users.clear()
        return cmds

    # -- plans ------------------------------------------------------------------------
