"""An in-memory online store (:class:`features.store_protocol.OnlineFeatureStore`) for tests.

It keeps every contribution (event time, impressions, clicks) per entity and partition shard and
answers by brute force, so it is the plain statement of what the Redis store promises
(``tests/features/test_store_contract.py`` runs the same suite against both): counters
summed over shards, strictly point-in-time pre-event features, each (topic, partition,
offset) counted once with replays answered from a replay cache of the last
``replay_batches`` batches, gaps and rewinds refused, event-time guarded attributes.

Where it differs, by design: nothing is ever evicted from an entity's history (the
Redis store keeps the latest ``pit_history`` events per entity and shard, and leaves a
shard's older part out of rows older than that); it has no caches, no fencing between
writers (one process, one event loop) and no metrics. :meth:`MemoryOnlineStore.snapshot`
and :meth:`MemoryOnlineStore.restore` stand for a server restart from an older copy (the
lost writes are gone and :meth:`MemoryOnlineStore.instance_id` changes).

Example::

    store = MemoryOnlineStore(partitions=2)
    result = await store.apply_batch("clicks", 0, [{"offset": 0, "ts": 1.0, "user_id": "u",
                                                    "item_id": "i", "label": 1}])
"""

from __future__ import annotations

import copy
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from features.counters import (
    CounterConfig,
    aggregate,
    decay_state,
    derive_features,
    resolve_refs,
)
from features.hashing import canonical
from features.sequence import member, newest, pre_event_sequences
from features.store_apply import (
    GapError,
    RewindError,
    batch_in_offset_order,
    event_id_hashes,
    event_impressions,
)
from features.store_core import BatchResult, latest_user_attrs
from features.store_reads import entity_counters, entity_kind, rows_at, wanted_counters

__all__ = ["MemoryIdWindow", "MemoryOnlineStore"]


def _json(value: Any) -> Any:
    """A value as the Redis store hands it back (JSON round trip)."""
    return json.loads(json.dumps(value, default=str))


class MemoryOnlineStore:
    """The online store's contract in memory (async methods, like ``OnlineStore``)."""

    def __init__(self, *, partitions: int, counters: CounterConfig | None = None,
                 pit_ties: bool = False, replay_batches: int = 8, clock=time.time,
                 seq_len: int = 0, **_ignored: Any) -> None:
        if partitions < 1:
            raise ValueError(
                f"partitions must be >= 1 (the source topic's count), got {partitions}")
        self.partitions = partitions
        self.counters = counters or CounterConfig()
        self.pit_ties = bool(pit_ties)
        self.replay_batches = replay_batches
        self.seq_len = seq_len
        self.clock = clock
        self._instance = uuid.uuid4().hex
        self._data = {
            # partition -> topic -> next offset to apply
            "offsets": {p: {} for p in range(partitions)},
            # partition -> entity -> [(event time, impressions, clicks)], in the order applied
            "log": {p: {} for p in range(partitions)},
            # (partition, topic) -> the last batches' {(offset, sub): (id hash, pre-state)}
            "replay": {},
            "items": {},  # item id -> (event time, attributes)
            "users": {},  # user id -> (event time, attributes)
            "codes": {},  # item id -> (codes, version)
            # partition -> user -> {member: event time}: its clicks (features/sequence.py)
            "seqs": {p: {} for p in range(partitions)},
        }

    # -- restarts -----------------------------------------------------------------------
    def snapshot(self) -> dict:
        """A copy of everything stored (what an AOF copy would hold)."""
        return copy.deepcopy(self._data)

    def restore(self, snapshot: dict) -> None:
        """Go back to ``snapshot``, as a server restarted from an older copy would."""
        self._data = copy.deepcopy(snapshot)
        self._instance = uuid.uuid4().hex

    async def instance_id(self) -> str:
        return self._instance

    # -- counters -----------------------------------------------------------------------
    def _contribution(self, t: float, imp: float, label: float, at: float) -> np.ndarray:
        """One contribution's state vector, decayed to ``at`` (never backwards)."""
        out = [imp, float(label)]
        for h in self.counters.half_lives:
            w = math.pow(2.0, -max(at - t, 0.0) / h)
            out += [imp * w, label * w]
        return np.array(out)

    def _pre(self, history: list[tuple[float, float, int]], ts: float) -> np.ndarray:
        """Contributions strictly before ``ts`` (``pit_ties``: or at it), decayed to it."""
        total = np.zeros(self.counters.width)
        for t, imp, label in history:
            if t < ts or (self.pit_ties and t == ts):
                total += self._contribution(t, imp, label, ts)
        return total

    def _state(self, partition: int, entity: str) -> np.ndarray:
        """The shard's state of an entity as the Redis store keeps it: decayed to its
        newest contribution's time, that time last (NaN: never written)."""
        history = self._data["log"][partition].get(entity, [])
        if not history:
            return np.append(np.zeros(self.counters.width), np.nan)
        newest = max(t for t, *_ in history)
        total = sum(self._contribution(t, imp, label, newest) for t, imp, label in history)
        return np.append(total, newest)

    def _item_view(self, item_ids) -> tuple[dict[str, dict], dict[str, dict]]:
        want = {i for i in item_ids if i}
        items, codes = self._data["items"], self._data["codes"]
        attrs = {i: items[i][1] for i in want if i in items}
        found = {i: codes[i][0] for i in want if i in codes}
        return attrs, found

    def _put(self, table: dict, entity_id: str, ts: float, attrs: Mapping[str, Any]) -> bool:
        """Event-time guarded merge: an older write never replaces newer attributes."""
        stored = table.get(entity_id)
        if stored is not None and ts < stored[0]:
            return False
        merged = dict(stored[1]) if stored else {}
        merged.update({k: _json(v) for k, v in attrs.items()})
        table[entity_id] = (ts, merged)
        return True

    async def apply_batch(self, topic: str, partition: int, events: Any,
                          expect_next: int | None = None) -> BatchResult:
        cfg = self.counters
        order, srt = batch_in_offset_order(events)
        n = len(order)
        attrs, codes = self._item_view(srt["item_id"].tolist())
        refs = resolve_refs(cfg, srt, attrs)
        nxt = self._data["offsets"][partition].get(topic, 0)
        if expect_next is not None and nxt < expect_next:
            raise GapError(topic, partition, nxt, expect_next)
        ids = event_id_hashes(srt["event_id"]) if "event_id" in srt else np.zeros(n, np.uint64)
        new = srt["offset"] >= nxt
        weights = event_impressions(srt)
        cache: dict = {}
        for entry in self._data["replay"].get((partition, topic), []):
            cache.update(entry)
        logs = self._data["log"]
        # Other shards as of the batch's start; the own shard grows event by event.
        others = {q: {e: list(h) for e, h in logs[q].items()}
                  for q in range(self.partitions) if q != partition}
        own = logs[partition]
        per_ref = np.zeros((len(refs.event), cfg.width))
        late = np.zeros(n, bool)
        valid = np.ones(n, bool)
        replayed_pre: dict[int, np.ndarray] = {}
        by_event: dict[int, list[int]] = {}
        for r, i in enumerate(refs.event.tolist()):
            by_event.setdefault(i, []).append(r)
        for i in range(n):
            key = (int(srt["offset"][i]), int(srt["sub"][i]))
            if not new[i]:
                hit = cache.get(key)
                if hit is None:
                    valid[i] = False
                elif hit[0] != int(ids[i]):
                    raise RewindError(topic, partition, key[0], nxt)
                else:
                    replayed_pre[i] = hit[1]
                continue
            ts, label, imp = float(srt["ts"][i]), int(srt["label"][i]), float(weights[i])
            for r in by_event.get(i, []):
                entity = refs.entities[int(refs.entity[r])]
                history = own.setdefault(entity, [])
                late[i] |= any(t > ts for t, *_ in history)
                per_ref[r] = self._pre(history, ts) + sum(
                    (self._pre(shard.get(entity, []), ts) for shard in others.values()),
                    np.zeros(cfg.width))
            for r in by_event.get(i, []):
                own[refs.entities[int(refs.entity[r])]].append((ts, imp, label))
        agg = aggregate(refs, per_ref)
        for i, pre in replayed_pre.items():
            agg[i] = pre
        next_offset = nxt
        if new.any():
            next_offset = int(srt["offset"][new].max()) + 1
            entry = {(int(srt["offset"][i]), int(srt["sub"][i])): (int(ids[i]), agg[i].copy())
                     for i in np.flatnonzero(new).tolist()}
            batches = self._data["replay"].setdefault((partition, topic), [])
            batches.append(entry)
            del batches[: max(len(batches) - self.replay_batches, 0)]
            self._data["offsets"][partition][topic] = next_offset
        for uid, (t, user_attrs) in latest_user_attrs(srt).items():
            self._put(self._data["users"], uid, t, user_attrs)  # guarded: replays change nothing
        dup = ~new
        back = np.argsort(order)
        feats = derive_features(cfg, agg)
        sequences = None
        if self.seq_len:
            in_order = self._sequences(partition, srt)
            sequences = [in_order[b] for b in back.tolist()]
        return BatchResult(
            sequences=sequences,
            features={k: v[back] for k, v in feats.items()}, valid=valid[back],
            replayed=dup[back], late=late[back], late_count=int(late.sum()),
            duplicate_count=int(dup.sum()), next_offset=next_offset, item_attrs=attrs,
            codes={i: c for i, c in codes.items() if c})

    def _user_entries(self, user: str, shards=None) -> list[tuple[float, str]]:
        seqs = self._data["seqs"]
        return [(t, m) for p in (range(self.partitions) if shards is None else shards)
                for m, t in seqs[p].get(user, {}).items()]

    def _sequences(self, partition: int, srt: dict[str, Any]) -> list[tuple[str, ...]]:
        """Pre-event sequences (every shard as of the batch's start), then the batch's
        clicks recorded in this partition's shard (newest ``4 * seq_len`` kept)."""
        users = [canonical(u) if u else "" for u in srt["user_id"]]
        members = [member(o, s, canonical(i)) for o, s, i in
                   zip(srt["offset"].tolist(), srt["sub"].tolist(), srt["item_id"], strict=True)]
        ts, labels = srt["ts"].tolist(), srt["label"].tolist()
        others = [p for p in range(self.partitions) if p != partition]
        own = {u: self._user_entries(u, [partition]) for u in set(users) if u}
        other = {u: self._user_entries(u, others) for u in set(users) if u}
        out = pre_event_sequences(own, other, users, ts, labels, members, self.seq_len)
        shard = self._data["seqs"][partition]
        for u, t, lab, m in zip(users, ts, labels, members, strict=True):
            if u and float(lab) > 0:
                shard.setdefault(u, {})[m] = float(t)
        for u in set(users):
            kept = sorted((t, m) for m, t in shard.get(u, {}).items())[-4 * self.seq_len:]
            if u in shard:
                shard[u] = {m: t for t, m in kept}
        return out

    async def next_offsets(self, partition: int) -> dict[str, int]:
        return dict(self._data["offsets"][partition])

    # -- reads ----------------------------------------------------------------------------
    def _total(self, cfg: CounterConfig, entities: Sequence[str], now: float) -> np.ndarray:
        """Every shard's state of each entity, decayed to ``now``, summed."""
        total = np.zeros((len(entities), cfg.width))
        for p in range(self.partitions):
            states = np.array([self._state(p, e) for e in entities]).reshape(-1, cfg.width + 1)
            total += decay_state(cfg, states, now)
        return total

    async def get_online_features(self, entity_rows: Any, features: list[str] | None = None,
                                  now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else float(now)
        cols = rows_at(entity_rows, now)
        wanted, cfg = wanted_counters(self.counters, features)
        attrs, codes = self._item_view(cols["item_id"].tolist())
        refs = resolve_refs(cfg, cols, attrs)
        total = self._total(cfg, refs.entities, now)
        feats = derive_features(cfg, aggregate(refs, total[refs.entity]))
        out: dict[str, Any] = {k: v for k, v in feats.items() if wanted is None or k in wanted}
        users = self._data["users"]
        if features is None or "user_attrs" in features:
            out["user_attrs"] = [users[u][1] if u in users else None for u in cols["user_id"]]
        if features is None or "item_attrs" in features:
            out["item_attrs"] = [attrs.get(i) for i in cols["item_id"]]
        if features is None or "codes" in features:
            out["codes"] = [codes.get(i) for i in cols["item_id"]]
        if self.seq_len and (features is None or "user_seq" in features):
            out["user_seq"] = [newest(self._user_entries(canonical(u)), now, self.seq_len)
                               if u else () for u in cols["user_id"]]
        return out

    async def entity_features(self, entity: str, now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else float(now)
        kind, ident = entity_kind(self.counters, entity)
        shards = np.array([self._state(p, entity) for p in range(self.partitions)])
        out = entity_counters(self.counters, entity, shards, now)
        if kind in ("user", "item"):
            table = self._data["users" if kind == "user" else "items"]
            out["attributes"] = dict(table[ident][1]) if ident in table else {}
        if kind == "item":
            stored = self._data["codes"].get(ident)
            out["codes"] = stored[0] if stored else None
            out["codes_version"] = stored[1] if stored else None
        return out

    # -- attributes and codes -------------------------------------------------------------
    async def put_item_attributes(self, items: Mapping[Any, Mapping[str, Any]],
                                  ts: float | None = None) -> int:
        written = 0
        for item_id, attrs in items.items():
            t = attrs.get("ts", ts)
            t = self.clock() if t is None else float(t)
            fields = {k: v for k, v in attrs.items() if k not in ("ts", "item_id", "vectors")}
            written += self._put(self._data["items"], canonical(item_id), t, fields)
        return written

    async def get_item_attributes_many(self, item_ids: Sequence[Any]) -> list[dict | None]:
        items = self._data["items"]
        return [dict(items[i][1]) if (i := canonical(x)) in items else None for x in item_ids]

    async def get_user_attributes_many(self, user_ids: Sequence[Any]) -> list[dict | None]:
        users = self._data["users"]
        return [dict(users[u][1]) if (u := canonical(x)) in users else None for x in user_ids]

    async def set_item_codes(self, item_id: Any, codes: Mapping[str, Sequence[int]],
                             version: str) -> None:
        clean = {str(k): [int(c) for c in v] for k, v in codes.items()}
        self._data["codes"][canonical(item_id)] = (clean, str(version))

    async def get_item_codes_many(self, item_ids: Sequence[Any]) -> list[dict | None]:
        stored = self._data["codes"]
        return [stored[i][0] if (i := canonical(x)) in stored else None for x in item_ids]


class MemoryIdWindow:
    """The duplicate-id window (:class:`features.store_protocol.DuplicateWindow`) in memory,
    in two generations as in Redis (:mod:`features.event_ids`)."""

    def __init__(self, capacity: int = 200_000) -> None:
        if capacity < 1:
            raise ValueError(f"the duplicate window must hold at least 1 id, got {capacity}")
        self.capacity = capacity
        #: (topic, partition) -> (current generation, previous one), each id -> "offset:sub"
        self.windows: dict[tuple[str, int], tuple[dict[str, str], dict[str, str]]] = {}

    async def duplicates(self, topic: str, partition: int, event_ids: Sequence[str],
                         offsets: np.ndarray, subs: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        current, previous = self.windows.setdefault((topic, partition), ({}, {}))
        first: list[str | None] = []
        for eid, off, sub in zip(event_ids, np.asarray(offsets).tolist(), np.asarray(subs).tolist(),
                                 strict=True):
            pos = f"{off}:{sub}"
            seen = previous.get(eid) or current.setdefault(eid, pos)
            first.append(None if seen == pos else seen)
        if len(current) >= self.capacity:
            self.windows[topic, partition] = ({}, current)
        return np.array([f is not None for f in first], bool), first
