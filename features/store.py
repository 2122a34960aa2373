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
counters of every contribution with event time strictly before it (``pit_ties=True``:
at its time too), from every partition's shard (docs/point-in-time.md,
:mod:`features.asof`). Its own partition's are exact; other partitions' shards are read
in the same round trip, i.e. as of batch start, and only their contributions older than
the event count, however far ahead in event time those partitions are. For that each
entity keeps its latest ``pit_history`` (K) to 2K-1 events per shard
(``{hw:p<P>}:~h2:<entity>``); a row older than a shard's retained history leaves that
shard's older part out (never the future), counted in
``headwater_features_pit_truncated_total``.

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

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from core.redis_client import aidentity, connect, connect_async, is_cluster
from features.hashing import canonical
from features.store_apply import plan_apply
from features.store_reads import plan_entity, plan_read

__all__ = ["BatchResult", "OnlineStore", "SyncOnlineStore"]

from features.store_core import (  # noqa: F401 - BatchResult is part of this module's API
    PUT,
    SCRIPTS,
    BatchResult,
    Command,
    Plan,
    StoreCore,
    decode_hash,
)


class _Planner(StoreCore):
    """The store's operations as plans; :class:`OnlineStore` and :class:`SyncOnlineStore` run them."""

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
            cmds.append(self.evalsha(PUT, [self.attrs_key("item", item_id)], args))
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
        return [(decode_hash(r).get("codes") or None) for r in res]

    def _plan_attrs(self, kind: str, ids: Sequence[Any]) -> Plan:
        res = yield [("HGETALL", self.attrs_key(kind, i)) for i in ids]
        return [decode_hash(r) or None for r in res]

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


class OnlineStore(_Planner):
    """Async online store over ``redis.asyncio`` (one pipeline per round trip, or one
    :class:`core.redis_client.RoundTrips` round trip when given a ``transport``).

    The client must return bytes (``decode_responses=False``): scripts return packed doubles.
    """

    def __init__(self, client: Any, transport: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = client
        self.cluster = is_cluster(client)
        #: what runs the plans' round trips: a :class:`core.redis_client.RoundTrips`
        #: (serving's reads), or None for redis-py's pipeline; scripts always load through
        #: ``client``
        self.transport = transport
        invalidations = getattr(transport, "invalidations", None)
        if invalidations is not None:  # Redis says what changed: cache every read
            self.read_cache.track(invalidations)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> OnlineStore:
        return cls(connect_async(url, decode_responses=False), **kwargs)

    async def aclose(self) -> None:
        if self.transport is not None:
            self.transport.close()
        await self.client.aclose()

    async def _execute(self, cmds: list[Command]) -> list[Any]:
        for _ in range(2):
            if self.transport is not None:
                res = await self.transport.execute(cmds)
            else:
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
            for text, _ in SCRIPTS:  # on every primary of a cluster
                await self.client.script_load(text)
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
        finally:
            plan.close()  # a failed round trip ends the plan now (its ``finally`` runs)

    async def instance_id(self) -> str:
        """The Redis server's ``run_id``: a new one means it restarted (and may have lost
        the writes of its last fsync window)."""
        return str(await aidentity(self.client))  # a cluster: every primary's

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


class SyncOnlineStore(_Planner):
    """The same store over a blocking ``redis.Redis`` client (CLI, benchmarks, tests).

    Method for method the twin of :class:`OnlineStore`, running the same plans.
    """

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = client
        self.cluster = self._cluster = is_cluster(client)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SyncOnlineStore:
        return cls(connect(url, decode_responses=False), **kwargs)

    def close(self) -> None:
        self.client.close()

    def _send(self, cmds: list[Command]) -> list[Any]:
        if not self._cluster:
            pipe = self.client.pipeline(transaction=False)
            for c in cmds:
                pipe.execute_command(*c)
            return pipe.execute(raise_on_error=False)
        # redis-py's blocking cluster pipeline asks a node for every EVALSHA's keys
        # (COMMAND GETKEYS: one more round trip per command, to a node that may be the
        # one that just failed); sent one by one, each command goes straight to its slot.
        out: list[Any] = []
        for c in cmds:
            try:
                out.append(self.client.execute_command(*c))
            except ResponseError as exc:
                out.append(exc)
        return out

    def _execute(self, cmds: list[Command]) -> list[Any]:
        for _ in range(2):
            res = self._send(cmds)
            self.round_trips += 1
            self.commands += len(cmds)
            if not self._check(res):
                return res
            for text, _ in SCRIPTS:
                self.client.script_load(text)
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
