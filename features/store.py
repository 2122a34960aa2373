"""The Redis online store: click counters, item/user attributes and item codes.

Key layout (docs/contracts.md). Counter state is one Redis hash per entity, Feast-style,
**sharded per source partition**: ``{hw:p<P>}:<entity>`` (e.g. ``{hw:p3}:item:242``),
with fields ``n``, ``c`` (all-time impressions and clicks), ``n@<h>``, ``c@<h>`` (sums
decayed with half-life ``h`` seconds) and ``t`` (the time they are decayed to). Beside
them, ``{hw:p<P>}:offsets`` (topic → next offset to apply), ``{hw:p<P>}:pit:<topic>``
(the replay cache) and ``{hw:p<P>}:writer`` (a random token set by every write: with the
next offset it names the shard's version, so states cached by this process are used
only while they are still the shard's, see :mod:`features.shard_cache`). Why shard per partition (docs/design.md principle 7):

- the hash tag makes every key a batch touches live in **one Redis Cluster slot**, so
  one Lua script can apply the whole batch atomically on a cluster too;
- the offsets record lives in the same slot, so "apply the batch **and** advance the
  next offset" is one atomic step, which is what makes updates idempotent per
  (topic, partition, offset) with no cross-partition coordination;
- a partition has exactly one owning worker at a time, so shards never contend.

Reads sum the shards of all partitions (decayed to the read time). Non-counter data is
not sharded: ``hw:attrs:item:<id>``, ``hw:attrs:user:<id>`` (event-time guarded writes)
and ``hw:codes:item:<id>`` (fields ``codes`` JSON and ``version``).

**Point in time.** :meth:`OnlineStore.apply_batch` returns, for every event, the
counters as they were just before it. They are exact for the batch's own partition
(computed in numpy from the shard's states read at batch start, event by event in
effect: :mod:`features.pointintime`); other partitions' shards are read in the same
round trip, i.e. as of batch start, and decayed to each event's time. With clicks keyed
by ``user_id``, a user lives in one partition, so user counters are fully exact; item
and genre counters lag other partitions by at most one batch.

**Writes are fenced.** A batch is written by one Lua script that first checks the
partition's recorded next offset is still the one the batch was computed from (only
that script moves it, always forward), then writes each touched entity's final state
once, the replay-cache entry and the new next offset (:mod:`features.store_apply`). A
stale writer (a zombie worker after a rebalance) is refused and re-reads.

**Round trips.** The store is written sans-I/O: each operation is a generator that
yields lists of Redis commands and receives their replies; :class:`OnlineStore`
(``redis.asyncio``, for the Faust worker) and :class:`SyncOnlineStore` (CLI, bench,
tests) only run those lists as one pipeline each. ``apply_batch`` costs two round trips
(read, then fenced write; one more when item attributes are not yet cached), whatever
the batch size; Redis work is O(distinct entities) per batch, not O(events).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.exceptions import NoScriptError, ResponseError

from features.counters import (
    CounterConfig,
)
from features.hashing import canonical
from features.shard_cache import ShardCache
from features.store_apply import latest_user_attrs, plan_apply
from features.store_reads import plan_entity, plan_read

__all__ = ["BatchResult", "OnlineStore", "SyncOnlineStore"]

Command = tuple[Any, ...]
Plan = Generator[list[Command], list[Any], Any]


def _script(name: str) -> tuple[str, str]:
    text = (importlib.resources.files("features") / "lua" / name).read_text(encoding="utf-8")
    return text, hashlib.sha1(text.encode()).hexdigest()


_APPLY, _READ, _PUT = _script("apply.lua"), _script("read.lua"), _script("put_attrs.lua")
_READ_OWN, _READ_SHARD = _script("read_own.lua"), _script("read_shard.lua")
_SCRIPTS = (_APPLY, _READ, _PUT, _READ_OWN, _READ_SHARD)


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


def _decode_hash(raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    return {k.decode(): json.loads(v) for k, v in raw.items() if k != b"_ts"}


class _StoreCore:
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
        clock=time.time,
    ) -> None:
        if partitions < 1:
            raise ValueError(
                f"partitions must be >= 1 (the source topic's count), got {partitions}"
            )
        self.partitions = partitions
        self.counters = counters or CounterConfig()
        self.prefix = prefix
        self.attr_cache_seconds = attr_cache_seconds
        self.replay_batches = replay_batches
        self.clock = clock
        self.round_trips = 0
        self.commands = 0
        self.miss_cache_seconds = miss_cache_seconds
        # Entity states as last read or written, per shard and shard version: a batch
        # reads only the entities not cached (features/shard_cache.py).
        self.shard_cache = ShardCache(self.counters.width + 1, shard_cache_entities)
        self._items: dict[str, tuple[float, dict, dict]] = {}
        self._absent: dict[str, float] = {}  # item id -> when to ask Redis again
        self._items_found = 0.0  # see _items_take
        self._users: dict[str, str] = {}
        # A private registry by default: two stores in one process must not collide on the
        # global one; the worker injects the registry it exports.
        registry = registry if registry is not None else CollectorRegistry()
        self._late = Counter(
            "headwater_features_late_events_total",
            "Click events older than an entity's counters (applied exactly, t not moved back).",
            ["topic"],
            registry=registry,
        )
        self._dupes = Counter(
            "headwater_features_duplicate_events_total",
            "Click events skipped because their offset was already applied.",
            ["topic"],
            registry=registry,
        )
        self._fenced = Counter(
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

    def attrs_key(self, kind: str, entity_id: Any) -> str:
        return f"{self.prefix}:attrs:{kind}:{canonical(entity_id)}"

    def codes_key(self, item_id: Any) -> str:
        return f"{self.prefix}:codes:item:{canonical(item_id)}"

    def _evalsha(
        self, script: tuple[str, str], keys: Sequence[str], args: Sequence[Any]
    ) -> Command:
        return ("EVALSHA", script[1], len(keys), *keys, *args)

    def _read_cmds(self, entities: Sequence[str], fields: list[str]) -> list[Command]:
        if not entities:
            return []
        return [
            self._evalsha(_READ, [self.shard_key(p, e) for e in entities], fields)
            for p in range(self.partitions)
        ]

    def _states(self, blob: bytes, width: int) -> np.ndarray:
        return np.frombuffer(blob, dtype="<f8").reshape(-1, width + 1)

    # -- item attributes and codes, with a short-lived cache ---------------------------
    def _plan_items(self, item_ids: Iterable[str]) -> Plan:
        now = self.clock()
        want = {i for i in item_ids if i}
        miss = self._items_miss(want, now)
        if miss:
            res = yield self._items_cmds(miss)
            self._items_take(miss, res, now)
        return self._items_out(want)

    def _items_miss(self, want: set[str], now: float) -> list[str]:
        """Items to ask Redis about: not cached (or expired) and not recently absent."""
        items, absent = self._items, self._absent
        return [
            i for i in want if (i not in items or items[i][0] < now) and absent.get(i, 0) < now
        ]

    def _items_cmds(self, miss: list[str]) -> list[Command]:
        cmds: list[Command] = []
        for i in miss:
            cmds += [("HGETALL", self.attrs_key("item", i)), ("HGETALL", self.codes_key(i))]
        return cmds

    def _items_take(self, miss: list[str], res: list[Any], now: float) -> None:
        """Cache the replies of :meth:`_items_cmds` (two per item)."""
        if len(self._items) > 200_000:
            self._items.clear()
        if len(self._absent) > 200_000:
            self._absent.clear()
        found = 0
        for k, i in enumerate(miss):
            attrs, codes = _decode_hash(res[2 * k]), _decode_hash(res[2 * k + 1])
            found += bool(attrs)
            if not (attrs or codes):
                # Remembered only briefly: the item event may be in flight. Without
                # this, a stream of unknown items costs two commands per item per batch.
                self._absent[i] = now + self.miss_cache_seconds
            else:
                self._items[i] = (now + self.attr_cache_seconds, attrs, codes.get("codes") or {})
        if miss:  # share of items asked about that had attributes, smoothed over batches
            self._items_found += 0.3 * (found / len(miss) - self._items_found)

    def _items_out(self, want: set[str]) -> tuple[dict[str, dict], dict[str, dict]]:
        items = self._items
        attrs_out = {i: items[i][1] for i in want if i in items}
        codes_out = {i: items[i][2] for i in want if i in items and items[i][2]}
        return attrs_out, codes_out

    def _user_attr_cmds(self, cols: Mapping[str, Any]) -> list[Command]:
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
            cmds.append(self._evalsha(_PUT, [self.attrs_key("user", uid)], args))
        if len(self._users) > 500_000:
            self._users.clear()
        return cmds

    # -- plans ------------------------------------------------------------------------
    def _plan_apply(
        self, topic: str, partition: int, events: Any, expect_next: int | None = None
    ) -> Plan:
        return plan_apply(self, topic, partition, events, expect_next)

    def _plan_read(
        self, entity_rows: Any, features: Sequence[str] | None, now: float | None
    ) -> Plan:
        return plan_read(self, entity_rows, features, now)

    def _plan_entity(self, entity: str, now: float | None) -> Plan:
        return plan_entity(self, entity, now)

    def _plan_put_items(self, items: Mapping[Any, Mapping[str, Any]], ts: float | None) -> Plan:
        cmds = []
        for item_id, attrs in items.items():
            t = attrs.get("ts", ts)
            t = self.clock() if t is None else float(t)
            args: list[Any] = [repr(t)]
            for k, v in attrs.items():
                if k not in ("ts", "item_id", "vectors"):
                    args += [k, json.dumps(v, default=str)]
            cmds.append(self._evalsha(_PUT, [self.attrs_key("item", item_id)], args))
            self._items.pop(canonical(item_id), None)
            self._absent.pop(canonical(item_id), None)
        res = yield cmds
        return int(sum(res))

    def _plan_set_codes(
        self, item_id: Any, codes: Mapping[str, Sequence[int]], version: str
    ) -> Plan:
        clean = {str(k): [int(c) for c in v] for k, v in codes.items()}
        self._items.pop(canonical(item_id), None)
        self._absent.pop(canonical(item_id), None)
        yield [
            (
                "HSET",
                self.codes_key(item_id),
                "codes",
                json.dumps(clean),
                "version",
                json.dumps(str(version)),
            )
        ]
        return None

    def _plan_get_codes(self, item_ids: Sequence[Any]) -> Plan:
        res = yield [("HGETALL", self.codes_key(i)) for i in item_ids]
        return [(_decode_hash(r).get("codes") or None) for r in res]

    def _plan_attrs(self, kind: str, ids: Sequence[Any]) -> Plan:
        res = yield [("HGETALL", self.attrs_key(kind, i)) for i in ids]
        return [_decode_hash(r) or None for r in res]

    def _plan_offsets(self, partition: int) -> Plan:
        (raw,) = yield [("HGETALL", f"{{{self.prefix}:p{partition}}}:offsets")]
        return {k.decode(): int(v) for k, v in raw.items()}

    def _check(self, res: list[Any]) -> bool:
        """True if scripts must be (re)loaded; raises the first other error."""
        errors = [r for r in res if isinstance(r, Exception)]
        if any(isinstance(e, NoScriptError) for e in errors):
            return True
        if errors:
            raise errors[0] if isinstance(errors[0], ResponseError) else RuntimeError(errors[0])
        return False


class OnlineStore(_StoreCore):
    """Async online store over ``redis.asyncio`` (one pipeline per round trip).

    The client must return bytes (``decode_responses=False``): scripts return packed doubles.
    """

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = client

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> OnlineStore:
        import redis.asyncio

        return cls(redis.asyncio.Redis.from_url(url, decode_responses=False), **kwargs)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _execute(self, cmds: list[Command]) -> list[Any]:
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            for c in cmds:
                pipe.execute_command(*c)
            res = await pipe.execute(raise_on_error=False)
            self.round_trips += 1
            self.commands += len(cmds)
            if not self._check(res):
                return res
            # Scripts were flushed (restart, SCRIPT FLUSH): load and re-run; re-running is
            # safe because every command in a plan is idempotent.
            for text, _ in _SCRIPTS:
                await self.client.execute_command("SCRIPT", "LOAD", text)
        raise RuntimeError("Redis keeps answering NOSCRIPT after SCRIPT LOAD")

    async def _run(self, plan: Plan, operation: str) -> Any:
        start = time.perf_counter()
        try:
            cmds = next(plan)
            while True:
                cmds = plan.send(await self._execute(cmds) if cmds else [])
        except StopIteration as stop:
            self._seconds.labels(operation).observe(time.perf_counter() - start)
            return stop.value

    async def apply_batch(
        self, topic: str, partition: int, events: Any, expect_next: int | None = None
    ) -> BatchResult:
        """Apply one batch of click events of one source partition; return pre-event features.

        ``events`` are columns (or rows, or an Arrow table) with ``offset``, ``sub``, ``ts``,
        ``user_id``, ``item_id``, ``label`` and optional ``context``/``user``. A batch must
        hold whole messages (all events of an offset). Idempotent per (topic, partition,
        offset): replaying gives the same state and the same features (replay cache).
        With ``expect_next``, a recorded next offset below it raises
        :class:`features.store_apply.GapError` (Redis lost writes) and nothing is written.
        """
        return await self._run(self._plan_apply(topic, partition, events, expect_next), "apply")

    async def next_offsets(self, partition: int) -> dict[str, int]:
        """Next offset to apply per topic for a partition: seek there on assignment."""
        return await self._run(self._plan_offsets(partition), "offsets")

    async def get_online_features(
        self,
        entity_rows: list[dict] | dict[str, list],
        features: list[str] | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Counter features (decayed to ``now``, summed over shards) for entity rows.

        Rows carry ``user_id`` and/or ``item_id`` (and ``context``). Returns columns, one
        value per row: the requested features (all by default) and, unless ``features``
        leaves them out, ``user_attrs``, ``item_attrs`` and ``codes``. One round trip
        (plus one for item attributes not in the short-lived cache).
        """
        return await self._run(self._plan_read(entity_rows, features, now), "read")

    async def entity_features(self, entity: str, now: float | None = None) -> dict[str, Any]:
        """One entity as served (``user:42``, ``item:242``, ``genre:Comedy``) for the CLI."""
        return await self._run(self._plan_entity(entity, now), "entity")

    async def put_item_attributes(
        self, items: Mapping[Any, Mapping[str, Any]], ts: float | None = None
    ) -> int:
        """Merge item attributes (``genres``, ``tags``, ``year``...), newest event time wins.

        Returns how many items were written (older writes are ignored).
        """
        return await self._run(self._plan_put_items(items, ts), "attrs")

    async def get_item_attributes_many(self, item_ids: Sequence[Any]) -> list[dict | None]:
        return await self._run(self._plan_attrs("item", item_ids), "attrs")

    async def get_user_attributes_many(self, user_ids: Sequence[Any]) -> list[dict | None]:
        return await self._run(self._plan_attrs("user", user_ids), "attrs")

    async def set_item_codes(
        self, item_id: Any, codes: Mapping[str, Sequence[int]], version: str
    ) -> None:
        """Store an item's quantized codes (``{"rq": [...], "vq": [...]}``) and codebook version."""
        await self._run(self._plan_set_codes(item_id, codes, version), "codes")

    async def get_item_codes_many(
        self, item_ids: Sequence[Any]
    ) -> list[dict[str, list[int]] | None]:
        return await self._run(self._plan_get_codes(item_ids), "codes")


class SyncOnlineStore(_StoreCore):
    """The same store over a blocking ``redis.Redis`` client (CLI, benchmarks, tests).

    Method for method the twin of :class:`OnlineStore`, running the same plans.
    """

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = client

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SyncOnlineStore:
        import redis

        return cls(redis.Redis.from_url(url, decode_responses=False), **kwargs)

    def close(self) -> None:
        self.client.close()

    def _execute(self, cmds: list[Command]) -> list[Any]:
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            for c in cmds:
                pipe.execute_command(*c)
            res = pipe.execute(raise_on_error=False)
            self.round_trips += 1
            self.commands += len(cmds)
            if not self._check(res):
                return res
            for text, _ in _SCRIPTS:
                self.client.execute_command("SCRIPT", "LOAD", text)
        raise RuntimeError("Redis keeps answering NOSCRIPT after SCRIPT LOAD")

    def _run(self, plan: Plan, operation: str) -> Any:
        start = time.perf_counter()
        try:
            cmds = next(plan)
            while True:
                cmds = plan.send(self._execute(cmds) if cmds else [])
        except StopIteration as stop:
            self._seconds.labels(operation).observe(time.perf_counter() - start)
            return stop.value

    def apply_batch(
        self, topic: str, partition: int, events: Any, expect_next: int | None = None
    ) -> BatchResult:
        return self._run(self._plan_apply(topic, partition, events, expect_next), "apply")

    def next_offsets(self, partition: int) -> dict[str, int]:
        return self._run(self._plan_offsets(partition), "offsets")

    def get_online_features(
        self, entity_rows: Any, features: list[str] | None = None, now: float | None = None
    ) -> dict[str, Any]:
        return self._run(self._plan_read(entity_rows, features, now), "read")

    def entity_features(self, entity: str, now: float | None = None) -> dict[str, Any]:
        return self._run(self._plan_entity(entity, now), "entity")

    def put_item_attributes(
        self, items: Mapping[Any, Mapping[str, Any]], ts: float | None = None
    ) -> int:
        return self._run(self._plan_put_items(items, ts), "attrs")

    def get_item_attributes_many(self, item_ids: Sequence[Any]) -> list[dict | None]:
        return self._run(self._plan_attrs("item", item_ids), "attrs")

    def get_user_attributes_many(self, user_ids: Sequence[Any]) -> list[dict | None]:
        return self._run(self._plan_attrs("user", user_ids), "attrs")

    def set_item_codes(
        self, item_id: Any, codes: Mapping[str, Sequence[int]], version: str
    ) -> None:
        self._run(self._plan_set_codes(item_id, codes, version), "codes")

    def get_item_codes_many(self, item_ids: Sequence[Any]) -> list[dict[str, list[int]] | None]:
        return self._run(self._plan_get_codes(item_ids), "codes")
