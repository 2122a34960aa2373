"""The Redis online store: click counters, item/user attributes and item codes.

Key layout (docs/contracts.md). Counter state is one Redis hash per entity, Feast-style,
**sharded per source partition**: ``{hw:p<P>}:<entity>`` (e.g. ``{hw:p3}:item:242``),
with fields ``n``, ``c`` (all-time impressions and clicks), ``n@<h>``, ``c@<h>`` (sums
decayed with half-life ``h`` seconds) and ``t`` (the time they are decayed to). Beside
them, ``{hw:p<P>}:offsets`` (topic → next offset to apply) and ``{hw:p<P>}:pit:<topic>``
(the replay cache). Why shard per partition (DESIGN.md principle 7):

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
(computed inside the script, event by event); other partitions' shards are read once,
in the same pipelined round trip, i.e. as of batch start, and decayed to each event's
time. With clicks keyed by ``user_id``, a user lives in one partition, so user counters
are fully exact; item and genre counters lag other partitions by at most one batch.

**Round trips.** The store is written sans-I/O: each operation is a generator that
yields lists of Redis commands and receives their replies; :class:`OnlineStore`
(``redis.asyncio``, for the Faust worker) and :class:`SyncOnlineStore` (CLI, bench,
tests) only run those lists as one pipeline each. ``apply_batch`` costs one round trip
(two when item attributes are not yet cached), whatever the batch size.
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
    aggregate,
    as_columns,
    decay_state,
    derive_features,
    half_life_label,
    resolve_refs,
)
from features.hashing import canonical

__all__ = ["BatchResult", "OnlineStore", "SyncOnlineStore"]

Command = tuple[Any, ...]
Plan = Generator[list[Command], list[Any], Any]


def _script(name: str) -> tuple[str, str]:
    text = (importlib.resources.files("features") / "lua" / name).read_text(encoding="utf-8")
    return text, hashlib.sha1(text.encode()).hexdigest()


_APPLY, _READ, _PUT = _script("apply.lua"), _script("read.lua"), _script("put_attrs.lua")
_SCRIPTS = (_APPLY, _READ, _PUT)


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
        self._items: dict[str, tuple[float, dict, dict]] = {}
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
        miss = [i for i in want if i not in self._items or self._items[i][0] < now]
        if miss:
            cmds: list[Command] = []
            for i in miss:
                cmds += [("HGETALL", self.attrs_key("item", i)), ("HGETALL", self.codes_key(i))]
            res = yield cmds
            if len(self._items) > 200_000:
                self._items.clear()
            for k, i in enumerate(miss):
                attrs, codes = _decode_hash(res[2 * k]), _decode_hash(res[2 * k + 1])
                if attrs or codes:  # a miss is not cached: the item event may be in flight
                    self._items[i] = (
                        now + self.attr_cache_seconds,
                        attrs,
                        codes.get("codes") or {},
                    )
        attrs_out = {i: self._items[i][1] for i in want if i in self._items}
        codes_out = {i: self._items[i][2] for i in want if i in self._items and self._items[i][2]}
        return attrs_out, codes_out

    def _user_attr_cmds(self, cols: Mapping[str, Any]) -> list[Command]:
        latest: dict[str, tuple[float, dict]] = {}
        for uid, ts, attrs in zip(cols["user_id"], cols["ts"], cols["user"], strict=True):
            if uid and attrs and (uid not in latest or ts >= latest[uid][0]):
                latest[uid] = (float(ts), attrs)
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
    def _plan_apply(self, topic: str, partition: int, events: Any) -> Plan:
        cfg = self.counters
        cols = as_columns(events)
        if "offset" not in cols or "label" not in cols:
            raise ValueError("apply_batch needs 'offset' (and 'sub') and 'label' columns")
        n = len(cols["ts"])
        order = np.lexsort((cols["sub"], cols["offset"]))
        srt = {
            k: (v[order] if isinstance(v, np.ndarray) else [v[i] for i in order])
            for k, v in cols.items()
        }
        attrs, codes = yield from self._plan_items(set(srt["item_id"]))
        refs = resolve_refs(cfg, srt, attrs)
        keys = [self.shard_key(partition, e) for e in refs.entities]
        nrefs = np.bincount(refs.event, minlength=n)
        evblob = (
            np.column_stack([srt["offset"], srt["sub"], srt["ts"], srt["label"], nrefs])
            .astype("<f8")
            .tobytes()
        )
        refblob = (refs.entity + 1).astype("<i4").tobytes()
        hls = ",".join(f"{h:g}" for h in cfg.half_lives)
        pit = f"{{{self.prefix}:p{partition}}}:pit:{topic}"
        offsets = f"{{{self.prefix}:p{partition}}}:offsets"
        cmds = [
            self._evalsha(
                _APPLY, [offsets, *keys, pit], [topic, hls, evblob, refblob, self.replay_batches]
            )
        ]
        others = [p for p in range(self.partitions) if p != partition] if keys else []
        for p in others:
            cmds.append(
                self._evalsha(
                    _READ, [self.shard_key(p, e) for e in refs.entities], cfg.state_fields
                )
            )
        cmds += self._user_attr_cmds(srt)
        res = yield cmds
        flags, preblob, late_count, dup_count, next_offset = res[0]
        per_ref = np.frombuffer(preblob, dtype="<f8").reshape(-1, cfg.width).copy()
        if others:
            ts_ref = srt["ts"][refs.event]
            for blob in res[1 : 1 + len(others)]:
                per_ref += decay_state(cfg, self._states(blob, cfg.width)[refs.entity], ts_ref)
        feats = derive_features(cfg, aggregate(refs, per_ref))
        flag = np.frombuffer(flags, dtype="S1")
        back = np.argsort(order)
        self._late.labels(topic).inc(int(late_count))
        self._dupes.labels(topic).inc(int(dup_count))
        return BatchResult(
            features={k: v[back] for k, v in feats.items()},
            valid=(flag != b"s")[back],
            replayed=np.isin(flag, [b"r", b"s"])[back],
            late=(flag == b"l")[back],
            late_count=int(late_count),
            duplicate_count=int(dup_count),
            next_offset=int(next_offset),
            item_attrs=attrs,
            codes=codes,
        )

    def _plan_read(
        self, entity_rows: Any, features: Sequence[str] | None, now: float | None
    ) -> Plan:
        now = self.clock() if now is None else float(now)
        if isinstance(entity_rows, Mapping):
            n = len(next(iter(entity_rows.values()))) if entity_rows else 0
            rows = {**entity_rows, "ts": np.full(n, now)}
        else:
            rows = [{**r, "ts": now} for r in entity_rows]
        cols = as_columns(rows)
        extras = ("user_attrs", "item_attrs", "codes")
        wanted = None if features is None else [f for f in features if f not in extras]
        cfg = self.counters
        if wanted is not None:
            unknown = sorted(set(wanted) - set(cfg.feature_names()))
            if unknown:
                raise KeyError(f"unknown features {unknown}; see CounterConfig.feature_names()")
            cfg = cfg.select(
                [
                    s.name
                    for s in cfg.specs
                    if set(cfg.select([s.name]).feature_names()) & set(wanted)
                ]
            )
        need_items = features is None or "item_attrs" in features or "codes" in features
        need_items = need_items or any(s.needs_item_attrs for s in cfg.specs)
        attrs, codes = (
            (yield from self._plan_items(set(cols["item_id"]))) if need_items else ({}, {})
        )
        refs = resolve_refs(cfg, cols, attrs)
        cmds = self._read_cmds(refs.entities, cfg.state_fields)
        n_read = len(cmds)
        users = sorted({u for u in cols["user_id"] if u})
        want_users = features is None or "user_attrs" in features
        if want_users:
            cmds += [("HGETALL", self.attrs_key("user", u)) for u in users]
        res = yield cmds
        total = np.zeros((len(refs.entities), cfg.width))
        for blob in res[:n_read]:
            total += decay_state(cfg, self._states(blob, cfg.width), now)
        feats = derive_features(cfg, aggregate(refs, total[refs.entity]))
        out: dict[str, Any] = {k: v for k, v in feats.items() if wanted is None or k in wanted}
        if want_users:
            user_map = dict(zip(users, map(_decode_hash, res[n_read:]), strict=True))
            out["user_attrs"] = [user_map.get(u) or None for u in cols["user_id"]]
        if features is None or "item_attrs" in features:
            out["item_attrs"] = [attrs.get(i) for i in cols["item_id"]]
        if features is None or "codes" in features:
            out["codes"] = [codes.get(i) for i in cols["item_id"]]
        return out

    def _plan_entity(self, entity: str, now: float | None) -> Plan:
        now = self.clock() if now is None else float(now)
        kind, sep, ident = entity.partition(":")
        names = [s.name for s in self.counters.specs]
        if not sep or kind not in names:
            raise ValueError(
                f"entity {entity!r}: expected '<counter>:<id>' with counter in {names}"
            )
        cfg = self.counters
        cmds = [
            self._evalsha(_READ, [self.shard_key(p, entity)], cfg.state_fields)
            for p in range(self.partitions)
        ]
        if kind in ("user", "item"):
            cmds.append(("HGETALL", self.attrs_key(kind, ident)))
        if kind == "item":
            cmds.append(("HGETALL", self.codes_key(ident)))
        res = yield cmds
        shards = np.vstack([self._states(b, cfg.width) for b in res[: self.partitions]])
        per_partition = decay_state(cfg, shards, now)
        total = per_partition.sum(axis=0)
        a, p = cfg.alpha, cfg.prior
        out: dict[str, Any] = {"entity": entity, "as_of": now}
        out["impressions_total"], out["clicks_total"] = int(total[0]), int(total[1])
        out["ctr_total"] = float((total[1] + a * p) / (total[0] + a))
        for j, h in enumerate(cfg.half_lives):
            lab = half_life_label(h)
            nh, ch = float(total[2 + 2 * j]), float(total[3 + 2 * j])
            out[f"impressions_{lab}"], out[f"clicks_{lab}"] = nh, ch
            out[f"ctr_{lab}"] = (ch + a * p) / (nh + a)
        out["impressions_by_partition"] = {
            q: int(v) for q, v in enumerate(per_partition[:, 0]) if v
        }
        ts = shards[:, cfg.width]
        out["updated_at"] = float(np.nanmax(ts)) if np.isfinite(ts).any() else None
        if kind in ("user", "item"):
            out["attributes"] = _decode_hash(res[self.partitions])
        if kind == "item":
            raw = _decode_hash(res[self.partitions + 1])
            out["codes"] = raw.get("codes")
            out["codes_version"] = raw.get("version")
        return out

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
        res = yield cmds
        return int(sum(res))

    def _plan_set_codes(
        self, item_id: Any, codes: Mapping[str, Sequence[int]], version: str
    ) -> Plan:
        clean = {str(k): [int(c) for c in v] for k, v in codes.items()}
        self._items.pop(canonical(item_id), None)
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

    async def apply_batch(self, topic: str, partition: int, events: Any) -> BatchResult:
        """Apply one batch of click events of one source partition; return pre-event features.

        ``events`` are columns (or rows, or an Arrow table) with ``offset``, ``sub``, ``ts``,
        ``user_id``, ``item_id``, ``label`` and optional ``context``/``user``. A batch must
        hold whole messages (all events of an offset). Idempotent per (topic, partition,
        offset): replaying gives the same state and the same features (replay cache).
        """
        return await self._run(self._plan_apply(topic, partition, events), "apply")

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

    def apply_batch(self, topic: str, partition: int, events: Any) -> BatchResult:
        return self._run(self._plan_apply(topic, partition, events), "apply")

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
