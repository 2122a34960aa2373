"""The online joiner: impressions + actions → one labelled training row per impression.

Serving logs what it showed (``impressions``: one message per answer, one impression
per candidate, with the feature row the model scored); producers log what users did
(``actions``). Both topics are partitioned by user, so one join partition ``p`` holds a
user's impressions and actions, and Faust assigns ``impressions[p]`` and ``actions[p]``
to the same worker (co-subscribed topics with the same partition count).

Per partition the state lives in Redis under the hash tag ``{hw:join:<impressions topic>:p}``:

- ``open``/``due``: impressions waiting for an action, with their expiry (event time of
  the impression + the attribution window ``HEADWATER_JOIN_WINDOW_SECONDS``); each
  open impression keeps its feature row as the bytes of its int64 tokens and float32
  values (``cb``/``db``, base64 in the JSON). Entries a joiner from before session 26
  wrote keep them as JSON numbers (``c``/``d``) and are read as well;
- ``held``/``heldx``: actions that arrived before their impression;
- ``closed``/``closedx``: impressions already turned into a row (label kept), so a
  second action is a duplicate and an action after a label-0 row is late;
- ``ui``: a user's latest impression per item, for actions without a request id;
- ``meta``: the next offset of each topic, the newest event time of each side, the
  watermark, the next row sequence number and the next outbox id;
- ``outbox``: rows (Arrow ``train-batches`` messages) and dead-letters written in the
  same transaction as the state they come from; sent, then deleted.

Every batch (and every clock tick) is one ``WATCH``/``MULTI`` transaction fenced on
``meta``: messages below the recorded offset were applied before (a replay after a
crash) and are skipped; the outbox is sent again after a crash, and the rows carry
their sequence number as ``offset`` (source ``joined:<impressions topic>``), so the
learner's per-source watermark drops a row sent twice. Each impression therefore
becomes exactly one training row through worker kill -9.

**Counters.** The online counters (the click path's store) count each impression once,
when it arrives, at the impression's time, and each matched click once, when it is
matched, at the click's time and without another impression (store events with
``impressions`` 0; :mod:`features.counters`). Both go through the outbox as store
batches numbered by their own gap-free sequence (source ``joined-counts:<impressions
topic>``), so the store's fence applies each exactly once through kill -9, and its
point-in-time rules hold: a row read as of ``t`` sees the impressions shown before ``t``
and the clicks made before ``t``, never a click after it.

**Time.** Labels are decided in event time: an action at ``a`` labels the impression at
``t`` 1 when ``t - lateness <= a <= t + window``. The watermark is the lower of the two
sides' newest event times minus ``HEADWATER_JOIN_LATENESS_SECONDS``; a side without
messages for ``HEADWATER_JOIN_IDLE_SECONDS`` (wall clock) stops holding it back, and with
both sides idle it advances with the wall clock (so the last windows of a quiet stream
close). An impression whose window end is at or below the watermark becomes a label-0
row. A replay of old events closes windows by the events' own times, not the clock.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pybase64
from prometheus_client import Counter, Gauge, Histogram

from core.settings import Settings
from features.defaults import row_builder as make_row_builder
from learner.batch import encode_batch
from streams.app import Message, Output
from streams.click_path import counter_store
from streams.deadletter import dead_letter, reason_kind
from streams.metrics import WorkerMetrics
from streams.schemas import ActionEvent, ImpressionEvent, decode_message

log = logging.getLogger(__name__)

_SEP = "\x1f"
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()
_LEN = struct.Struct("<HH")
#: Outbox entries applied to the online counters (not sent): each impression once when it
#: arrives (at its time: 1 impression, 0 clicks), each matched click once when it is
#: matched (at the click's time: 0 impressions, 1 click).
COUNTERS = "\x00counters"
_DELAY_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600)


def _row(imp: dict[str, Any], packed: str, listed: str, dtype: str) -> np.ndarray:
    """One open impression's tokens or values: its bytes (``packed``: ``bytes`` as built,
    base64 text once read back from Redis), or the JSON numbers (``listed``) a joiner
    from before session 26 stored.

    >>> tokens = np.array([7, -2], "<i8")
    >>> _row({"cb": tokens.tobytes()}, "cb", "c", "<i8").tolist()
    [7, -2]
    >>> _row(_dec.decode(_enc.encode({"cb": tokens.tobytes()})), "cb", "c", "<i8").tolist()
    [7, -2]
    >>> _row({"c": [7, -2]}, "cb", "c", "<i8").tolist()
    [7, -2]
    """
    raw = imp.get(packed)
    if raw is None:
        return np.asarray(imp[listed], dtype)
    return np.frombuffer(pybase64.b64decode(raw) if isinstance(raw, str) else raw, dtype)


def pack_output(out: Output) -> bytes:
    topic, key, value, _ = out
    t, k = topic.encode(), key or b""
    return _LEN.pack(len(t), len(k)) + t + k + value


def unpack_output(raw: bytes) -> Output:
    """
    >>> unpack_output(pack_output(("t", b"k", b"v", None)))
    ('t', b'k', b'v', None)
    """
    nt, nk = _LEN.unpack_from(raw)
    o = _LEN.size
    return raw[o:o + nt].decode(), raw[o + nt:o + nt + nk] or None, raw[o + nt + nk:], None


class JoinMetrics:
    def __init__(self, registry) -> None:
        r = registry
        self.rows = Counter("headwater_join_rows", "Training rows the joiner emitted", ["label"], registry=r)
        self.actions = Counter("headwater_join_actions",
                               "Actions by outcome: matched, held (before their impression), "
                               "duplicate, late (dead-lettered)", ["outcome"], registry=r)
        self.impressions = Counter("headwater_join_impressions",
                                   "Impressions by outcome: opened, matched_held, late, duplicate",
                                   ["outcome"], registry=r)
        self.open = Gauge("headwater_join_open_impressions", "Impressions waiting for an action",
                          ["partition"], registry=r)
        self.delay = Histogram("headwater_join_label_delay_seconds",
                               "Event time from an impression to its row (an action's time, or "
                               "the watermark that closed its window)", buckets=_DELAY_BUCKETS,
                               registry=r)
        self.watermark = Gauge("headwater_join_watermark_seconds", "Join watermark (event time)",
                               ["partition"], registry=r)


@dataclass
class _Batch:
    """What one transaction changes (a local overlay over the Redis state)."""

    open: dict[str, bytes | None] = field(default_factory=dict)  # None: deleted
    due: dict[str, float | None] = field(default_factory=dict)
    held: dict[str, bytes | None] = field(default_factory=dict)
    heldx: dict[str, float | None] = field(default_factory=dict)
    closed: dict[str, bytes | None] = field(default_factory=dict)
    closedx: dict[str, float | None] = field(default_factory=dict)
    ui: dict[str, str | None] = field(default_factory=dict)
    rows: list[tuple[dict, int, float]] = field(default_factory=list)  # (impression, label, decided at)
    dead: list[Output] = field(default_factory=list)
    counts: list[dict] = field(default_factory=list)  # counter events, in the order decided
    #: metric increments, (counter, labels) -> n: applied once the transaction commits,
    #: so a transaction retried after a WATCH conflict does not count twice
    tally: collections.Counter = field(default_factory=collections.Counter)


class JoinHandler:
    """The joiner's domain step: one partition's batch of impressions or actions.

    ``send`` (set by the worker) produces outputs; the handler sends its outbox itself,
    under the partition's lock, and returns nothing to the agent.
    """

    concurrent_partitions = True

    def __init__(self, settings: Settings, client, metrics: WorkerMetrics, state=None,
                 builder=None, clock=time.time, store=None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.imp_topic = self.topics["impressions"]
        self.act_topic = self.topics["actions"]
        self.client = client
        self.metrics = metrics
        self.state = state
        self.m = JoinMetrics(metrics.registry)
        self.builder = builder or make_row_builder(settings)
        self.schema = self.builder.schema
        #: the online counters (the click path's store: one per registry)
        self.store = store or counter_store(settings, client, self.builder, metrics.registry)
        self.window = settings.join_window_seconds
        self.lateness = settings.join_lateness_seconds
        self.idle = settings.join_idle_seconds
        self.clock = clock
        self.source = f"joined:{self.imp_topic}"
        #: the counter events' source in the online store (its own gap-free sequence)
        self.count_source = f"joined-counts:{self.imp_topic}"
        self.send = None
        #: where a gap is re-read from (``streams.events.EventLog``; set by the worker)
        self.events = None
        #: (topic, partition) -> the log end offset the consumer last saw (set by the
        #: worker); None: a quiet side counts as idle on the wall clock alone
        self.highwater = None
        #: a list to collect every row's label delay in (benchmarks); None: not kept
        self.delays: list[float] | None = None
        self._locks: dict[int, asyncio.Lock] = {}
        #: partition -> hash name -> field -> value read ahead for the batch in progress
        self._cache: dict[int, dict[str, dict[str, Any]]] = {}
        #: (partition, side) -> wall time of the side's last message (in memory only)
        self._seen: dict[tuple[int, str], float] = {}
        #: partition -> (wall time, watermark) when both sides went idle
        self._idle_from: dict[int, tuple[float, float]] = {}
        self._started = clock()
        #: partition -> a watermark floor set by :meth:`close_until`
        self._floor: dict[int, float] = {}
        self.assigned: set[int] = set()
        #: partitions whose outbox may hold entries (a flush in progress or failed)
        self._unsent: set[int] = set()

    # -- keys ------------------------------------------------------------------------
    def key(self, partition: int, name: str) -> str:
        # Named by the impressions topic: two deployments (topic prefixes) sharing one
        # Redis never touch each other's windows.
        return f"{{hw:join:{self.imp_topic}:{partition}}}:{name}"

    def _lock(self, partition: int) -> asyncio.Lock:
        return self._locks.setdefault(partition, asyncio.Lock())

    def on_assigned(self, partitions) -> None:
        self.assigned.update(partitions)

    def on_revoked(self, partitions) -> None:
        for p in partitions:
            self.assigned.discard(p)
            self._idle_from.pop(p, None)

    # -- agent entry points ----------------------------------------------------------
    async def __call__(self, topic: str, partition: int, messages: list[Message]) -> list[Output]:
        side = "imp" if topic == self.imp_topic else "act"
        self._seen[partition, side] = self.clock()
        self._idle_from.pop(partition, None)
        async with self._lock(partition):
            if await self._transact(partition, topic, messages) or partition in self._unsent:
                await self._flush(partition)
        return []

    async def tick(self, wait: bool = False) -> None:
        """Advance every assigned partition's watermark by the idle rules; close windows.

        A partition whose batch is in progress is skipped (that batch's own transaction
        advances the watermark by the same rules) unless ``wait``: the clock never queues
        behind the stream. The outbox is read only when the tick wrote to it or a send
        failed before."""
        for p in sorted(self.assigned):
            lock = self._lock(p)
            if lock.locked() and not wait:
                continue
            async with lock:
                if await self._transact(p, None, []) or p in self._unsent:
                    await self._flush(p)

    async def close_until(self, event_time: float) -> None:
        """Move every assigned partition's watermark to at least ``event_time`` now and close
        the windows it passes (the end of a finite replay; a live stream's idle clock does
        this by itself)."""
        for p in sorted(self.assigned):
            self._floor[p] = max(self._floor.get(p, float("-inf")), event_time)
        await self.tick(wait=True)

    async def flush_all(self) -> None:
        """Send what a crash left in the outbox of every assigned partition."""
        for p in sorted(self.assigned):
            async with self._lock(p):
                await self._flush(p)

    # -- the transaction -------------------------------------------------------------
    def _idle(self, partition: int, side: str, now: float, meta: dict[str, str]) -> bool:
        """No message for ``idle`` seconds, and nothing left to read (a side behind its log
        end is catching up, not idle: during a catch-up or replay only event time counts)."""
        if now - self._seen.get((partition, side), self._started) < self.idle:
            return False
        if self.highwater is None:
            return True
        topic = self.imp_topic if side == "imp" else self.act_topic
        end = self.highwater(topic, partition)
        return end is not None and int(meta.get(f"off:{topic}", 0)) >= end

    async def _transact(self, p: int, topic: str | None, messages: list[Message]) -> bool:
        """One fenced transaction; True when it wrote outbox entries."""
        from redis.exceptions import WatchError

        meta_key = self.key(p, "meta")
        while True:
            async with self.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(meta_key)
                    meta = {k.decode(): v.decode() for k, v in (await pipe.hgetall(meta_key)).items()}
                    todo = messages
                    if topic is not None:
                        recorded = int(meta.get(f"off:{topic}", 0))
                        todo = [m for m in messages if m[0] >= recorded]
                        if messages and recorded < messages[0][0]:
                            todo = await self._read_gap(topic, p, recorded, messages[0][0]) + todo
                        if not todo:
                            return False
                    b = _Batch()
                    self._cache[p] = {}
                    await self._apply(pipe, p, topic, todo, meta, b)
                    wm_before = float(meta.get("wm", "-inf"))
                    wm = self._watermark(p, meta)
                    if wm > wm_before:
                        meta["wm"] = repr(wm)
                        await self._expire(pipe, p, wm, b)
                    if topic is None and not b.rows and not b.dead and not b.counts \
                            and wm <= wm_before:
                        return False
                    outbox = self._outputs(p, meta, b)
                    pipe.multi()
                    self._write(pipe, p, meta, b, outbox)
                    n_open = (await pipe.execute())[-1]
                except WatchError:
                    continue
            break
        self._account(p, meta, b, n_open)
        return bool(outbox)

    async def _read_gap(self, topic: str, p: int, start: int, stop: int) -> list[Message]:
        log.warning("join state of %s[%d] ends at offset %d, batch starts at %d: re-reading",
                    topic, p, start, stop)
        if self.events is None:
            raise RuntimeError("JoinHandler.events is not set: cannot re-read a gap")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.events.read_range, topic, p, start, stop)

    def _watermark(self, p: int, meta: dict[str, str]) -> float:
        now = self.clock()
        wm = float(meta.get("wm", "-inf"))
        # a side never seen holds the watermark back until it has been idle long enough
        sides = [float(meta.get(f"max:{s}", "-inf")) - self.lateness for s in ("imp", "act")
                 if not self._idle(p, s, now, meta)]
        idle_both = len(sides) == 0
        if sides and not idle_both:
            cand = min(sides)
        elif idle_both and ("max:imp" in meta or "max:act" in meta):
            newest = max(float(meta[k]) for k in ("max:imp", "max:act") if k in meta) - self.lateness
            start_wall, start_wm = self._idle_from.setdefault(p, (now, max(wm, newest)))
            cand = start_wm + (now - start_wall)
        else:
            cand = wm
        return max(wm, cand, self._floor.get(p, float("-inf")))

    async def _get(self, pipe, p: int, name: str, keys: list[str], overlay: dict) -> dict[str, Any]:
        """Values of ``keys`` in hash ``name``: the batch's own changes first, then what
        :meth:`_prefetch` read, then Redis."""
        out = {k: overlay[k] for k in keys if k in overlay}
        cache = self._cache[p].get(name, {})
        out.update({k: cache[k] for k in keys if k not in out and k in cache})
        rest = [k for k in dict.fromkeys(keys) if k not in out]
        if rest:
            vals = await pipe.hmget(self.key(p, name), rest)
            out.update(zip(rest, vals, strict=True))
        return out

    async def _prefetch(self, p: int, reads: dict[str, list[str]]) -> None:
        """Read many fields of several hashes in one round trip (consistent with the
        transaction: every writer changes the watched ``meta``, so EXEC fails if any moved)."""
        names = [n for n, ks in reads.items() if ks]
        if not names:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.hmget(self.key(p, n), reads[n])
            values = await pipe.execute()
        for n, vals in zip(names, values, strict=True):
            self._cache[p].setdefault(n, {}).update(zip(reads[n], vals, strict=True))

    async def _apply(self, pipe, p: int, topic: str | None, messages: list[Message],
                     meta: dict[str, str], b: _Batch) -> None:
        if topic is None or not messages:
            return
        kind = ImpressionEvent if topic == self.imp_topic else ActionEvent
        side = "imp" if kind is ImpressionEvent else "act"
        events = []
        for offset, key, value in messages:
            d = decode_message(value, kind, self.settings.max_message_bytes)
            for i, raw, reason in d.errors:
                self._dead(b, reason, topic, p, offset, raw, i, key)
            events += [(offset, key, sub, ev, derived)
                       for ev, sub, derived in zip(d.events, d.subs, d.derived, strict=True)]
        b.tally[self.metrics.messages_in, topic] += len(messages)
        b.tally[self.metrics.events_valid, topic] += len(events)
        evs = [e[3] for e in events]
        self._cache[p] = {}
        if kind is ImpressionEvent:
            ks = [f"{ev.request_id}{_SEP}{c.item_id}" for ev in evs for c in ev.candidates]
            anon = [f"~{ev.user_id}{_SEP}{c.item_id}" for ev in evs for c in ev.candidates]
            await self._prefetch(p, {"open": ks, "closed": ks, "held": ks + anon})
        else:
            uis = [f"{ev.user_id}{_SEP}{ev.item_id}" for ev in evs if ev.request_id is None]
            await self._prefetch(p, {"ui": uis})
            ks = [f"{ev.request_id}{_SEP}{ev.item_id}" for ev in evs if ev.request_id is not None]
            for f in uis:
                k = self._cache[p]["ui"].get(f)
                if k is not None:
                    ks.append(k.decode() if isinstance(k, bytes) else k)
            held = ks + [f"~{f}" for f in uis]
            await self._prefetch(p, {"open": ks, "closed": ks, "held": held})
        meta[f"off:{topic}"] = str(messages[-1][0] + 1)
        if events:
            newest = max(ev.ts for ev in evs)
            meta[f"max:{side}"] = repr(max(newest, float(meta.get(f"max:{side}", "-inf"))))
        wm = float(meta.get("wm", "-inf"))
        for offset, key, sub, ev, rows in events:
            if kind is ImpressionEvent:
                await self._impression(pipe, p, ev, rows, offset, key, sub, wm, b)
            else:
                await self._action(pipe, p, ev, offset, key, sub, wm, b)

    async def _impression(self, pipe, p, ev: ImpressionEvent, rows: tuple[np.ndarray, np.ndarray],
                          offset, key, sub, wm, b: _Batch) -> None:
        if ev.schema_hash != self.schema.hash:
            self._dead(b, f"impressions[{sub}]: logged under feature schema {ev.schema_hash[:12]}, "
                          f"the worker's is {self.schema.hash[:12]}: rows would not match the model",
                       self.imp_topic, p, offset, _enc.encode(ev), sub, key)
            return
        cat, dense = rows  # decoded and checked by decode_message
        if cat.shape[1] != len(self.schema.categorical) or dense.shape[1] != len(self.schema.dense):
            self._dead(b, f"impressions[{sub}]: rows of {cat.shape[1]} categorical and "
                          f"{dense.shape[1]} dense fields, the feature schema has "
                          f"{len(self.schema.categorical)} and {len(self.schema.dense)}",
                       self.imp_topic, p, offset, _enc.encode(ev), sub, key)
            return
        user = str(ev.user_id)
        seen: set[str] = set()
        keys = []
        for c in ev.candidates:
            k = f"{ev.request_id}{_SEP}{c.item_id}"
            if k not in seen:  # the same item twice in one answer: its first position counts
                seen.add(k)
                keys.append((k, c))
        ks = [k for k, _ in keys]
        opened = await self._get(pipe, p, "open", ks, b.open)
        closed = await self._get(pipe, p, "closed", ks, b.closed)
        anon = [f"~{user}{_SEP}{c.item_id}" for _, c in keys]
        held = await self._get(pipe, p, "held", ks + anon, b.held)
        for (k, c), a_key in zip(keys, anon, strict=True):
            if opened.get(k) is not None or closed.get(k) is not None:
                b.tally[self.m.impressions, "duplicate"] += 1
                continue
            imp = {"k": k, "rid": ev.request_id, "ts": ev.ts, "u": user, "i": str(c.item_id),
                   "pos": c.position, "cb": cat[c.position].tobytes(),  # "<i8", "<f4"
                   "db": dense[c.position].tobytes()}
            self._count(b, imp, ev.ts, click=False)  # shown: counted now, at its own time
            action = None
            for hk in (k, a_key):
                raw = held.get(hk)
                if raw is not None:
                    a = _dec.decode(raw)
                    if ev.ts - self.lateness <= a["ts"] <= ev.ts + self.window:
                        action = (hk, a)
                        break
            if action is not None:
                hk, a = action
                b.held[hk], b.heldx[hk] = None, None
                held[hk] = None
                self._count(b, imp, a["ts"], click=True)
                self._close(b, imp, 1, a["ts"])
                b.tally[self.m.impressions, "matched_held"] += 1
                continue
            if ev.ts + self.window <= wm:
                self._close(b, imp, 0, wm)
                b.tally[self.m.impressions, "late"] += 1
                continue
            b.open[k] = _enc.encode(imp)
            b.due[k] = ev.ts + self.window
            b.ui[f"{user}{_SEP}{c.item_id}"] = k
            b.tally[self.m.impressions, "opened"] += 1

    async def _action(self, pipe, p, ev: ActionEvent, offset, key, sub, wm, b: _Batch) -> None:
        user, item = str(ev.user_id), str(ev.item_id)
        raw_event = _enc.encode(ev)
        if ev.request_id is not None:
            k = f"{ev.request_id}{_SEP}{item}"
        else:
            k = (await self._get(pipe, p, "ui", [f"{user}{_SEP}{item}"], b.ui)).get(f"{user}{_SEP}{item}")
            k = k.decode() if isinstance(k, bytes) else k
        if k is not None:
            imp_raw = (await self._get(pipe, p, "open", [k], b.open)).get(k)
            if imp_raw is not None:
                imp = _dec.decode(imp_raw)
                if imp["ts"] - self.lateness <= ev.ts <= imp["ts"] + self.window:
                    b.open[k], b.due[k] = None, None
                    self._count(b, imp, ev.ts, click=True)
                    self._close(b, imp, 1, ev.ts)
                    b.tally[self.m.actions, "matched"] += 1
                    return
                if ev.request_id is not None or ev.ts > imp["ts"]:
                    self._late(b, p, offset, key, sub, raw_event,
                               f"actions[{sub}]: action at {ev.ts:.3f} is outside the attribution "
                               f"window of its impression at {imp['ts']:.3f} "
                               f"({self.window:.0f} s)")
                    return
            closed = (await self._get(pipe, p, "closed", [k], b.closed)).get(k)
            if closed is not None:
                label = _dec.decode(closed)["label"]
                if label == 1:
                    b.tally[self.m.actions, "duplicate"] += 1
                    return
                self._late(b, p, offset, key, sub, raw_event,
                           f"actions[{sub}]: late action: its impression's window closed "
                           f"(label 0 emitted) before it arrived")
                return
        hk = f"{ev.request_id}{_SEP}{item}" if ev.request_id is not None else f"~{user}{_SEP}{item}"
        if ev.ts + self.window <= wm:
            self._late(b, p, offset, key, sub, raw_event,
                       f"actions[{sub}]: no impression found and the watermark has passed "
                       f"the action's time plus the window: late or never shown")
            return
        if (await self._get(pipe, p, "held", [hk], b.held)).get(hk) is not None:
            b.tally[self.m.actions, "duplicate"] += 1
            return
        b.held[hk] = _enc.encode({"ts": ev.ts, "event_id": str(ev.event_id), "o": offset, "s": sub})
        b.heldx[hk] = ev.ts
        b.tally[self.m.actions, "held"] += 1

    async def _expire(self, pipe, p: int, wm: float, b: _Batch) -> None:
        due = [k.decode() for k in await pipe.zrangebyscore(self.key(p, "due"), "-inf", wm)]
        due = [k for k in due if b.due.get(k, 0.0) is not None]
        due += [k for k, t in b.due.items() if t is not None and t <= wm and k not in due]
        if due:
            imps = await self._get(pipe, p, "open", due, b.open)
            for k in due:
                raw = imps.get(k)
                if raw is None:
                    continue
                b.open[k], b.due[k] = None, None
                self._close(b, _dec.decode(raw), 0, wm)
        stale = [k.decode() for k in await pipe.zrangebyscore(self.key(p, "heldx"), "-inf",
                                                               wm - self.window)]
        stale = [k for k in stale if b.heldx.get(k, 0.0) is not None]
        if stale:
            held = await self._get(pipe, p, "held", stale, b.held)
            for k in stale:
                raw = held.get(k)
                b.held[k], b.heldx[k] = None, None
                if raw is not None:
                    a = _dec.decode(raw)
                    self._late(b, p, a["o"], None, a["s"], raw,
                               f"actions[{a['s']}]: no impression arrived within the window "
                               f"for action {a['event_id']!r} (held until the watermark passed)")
        cutoff = wm - 2 * self.window - self.lateness
        old = [k.decode() for k in await pipe.zrangebyscore(self.key(p, "closedx"), "-inf", cutoff)]
        if old:
            vals = await self._get(pipe, p, "closed", old, b.closed)
            uis = {}
            for k in old:
                b.closed[k], b.closedx[k] = None, None
                if vals.get(k):
                    uis[_dec.decode(vals[k])["ui"]] = k
            if uis:
                cur = await self._get(pipe, p, "ui", list(uis), b.ui)
                for f, k in uis.items():
                    v = cur.get(f)
                    if (v.decode() if isinstance(v, bytes) else v) == k:
                        b.ui[f] = None

    @staticmethod
    def _count(b: _Batch, imp: dict, ts: float, click: bool) -> None:
        """A counter event: the impression (1 impression at its time) or its click (1 click
        at the click's time, no impression: the impression was counted when shown)."""
        eid = f"{imp['rid']}:{imp['pos']}" + (":click" if click else "")
        b.counts.append({"event_id": eid, "ts": ts, "user_id": imp["u"], "item_id": imp["i"],
                         "label": int(click), "impressions": 0 if click else 1})

    def _close(self, b: _Batch, imp: dict, label: int, at: float) -> None:
        k = imp["k"]
        b.closed[k] = _enc.encode({"label": label, "ui": f"{imp['u']}{_SEP}{imp['i']}"})
        b.closedx[k] = imp["ts"]
        b.rows.append((imp, label, at))

    def _late(self, b: _Batch, p, offset, key, sub, raw, reason) -> None:
        b.tally[self.m.actions, "late"] += 1
        self._dead(b, reason, self.act_topic, p, offset, raw, sub, key)

    def _dead(self, b: _Batch, reason, topic, p, offset, raw, index, key) -> None:
        b.dead.append((self.topics["dead-letter"], key, dead_letter(reason, topic, p, offset, raw, index), None))
        b.tally[self.metrics.dead_letters, topic, reason_kind(reason)] += 1

    def _outputs(self, p: int, meta: dict[str, str], b: _Batch) -> dict[int, bytes]:
        """The outbox entries of this transaction: counter events (numbered by their own
        gap-free sequence ``cseq``, the store's fence), Arrow row messages, dead-letters."""
        out: list[Output] = []
        step = self.settings.train_message_rows
        cseq = int(meta.get("cseq", 0))
        for start in range(0, len(b.counts), step):
            chunk = [{**c, "offset": cseq + k, "sub": 0}
                     for k, c in enumerate(b.counts[start:start + step])]
            out.append((COUNTERS, None, _enc.encode(chunk), None))
            cseq += len(chunk)
        meta["cseq"] = str(cseq)
        seq = int(meta.get("seq", 0))
        for start in range(0, len(b.rows), step):
            chunk = b.rows[start:start + step]
            out.append((self.topics["train-batches"], str(p).encode(),
                        self._encode(chunk, p, seq), None))
            seq += len(chunk)
        meta["seq"] = str(seq)
        out += b.dead
        first = int(meta.get("out", 0))
        meta["out"] = str(first + len(out))
        return {first + i: pack_output(o) for i, o in enumerate(out)}

    def _encode(self, rows: list[tuple[dict, int, float]], p: int, seq: int) -> bytes:
        n = len(rows)
        cat = np.stack([_row(r[0], "cb", "c", "<i8") for r in rows]).astype(np.int64, copy=False).reshape(
            n, len(self.schema.categorical))
        dense = np.stack([_row(r[0], "db", "d", "<f4") for r in rows]).astype(np.float32, copy=False).reshape(
            n, len(self.schema.dense))
        cols: dict[str, Any] = {
            "event_id": np.asarray([f"{r[0]['rid']}:{r[0]['pos']}" for r in rows], dtype=object),
            "ts": np.asarray([r[0]["ts"] for r in rows], np.float64),
            "label": np.asarray([r[1] for r in rows], np.int8),
            "offset": np.arange(seq, seq + n, dtype=np.int64),
            "sub": np.zeros(n, np.int32),
        }
        for j, f in enumerate(self.schema.categorical):
            cols[f"c:{f}"] = cat[:, j]
        for j, d in enumerate(self.schema.dense):
            cols[f"d:{d}"] = dense[:, j]
        return encode_batch(cols, self.schema.to_json(), self.schema.hash, self.source, p, seq, seq + n)

    def _write(self, pipe, p: int, meta: dict[str, str], b: _Batch, outbox: dict[int, bytes]) -> None:
        for name, changes in (("open", b.open), ("held", b.held), ("closed", b.closed), ("ui", b.ui)):
            put = {k: v for k, v in changes.items() if v is not None}
            gone = [k for k, v in changes.items() if v is None]
            if put:
                pipe.hset(self.key(p, name), mapping=put)
            if gone:
                pipe.hdel(self.key(p, name), *gone)
        for name, changes in (("due", b.due), ("heldx", b.heldx), ("closedx", b.closedx)):
            put = {k: v for k, v in changes.items() if v is not None}
            gone = [k for k, v in changes.items() if v is None]
            if put:
                pipe.zadd(self.key(p, name), put)
            if gone:
                pipe.zrem(self.key(p, name), *gone)
        if outbox:
            pipe.hset(self.key(p, "outbox"), mapping={str(i): v for i, v in outbox.items()})
        pipe.hset(self.key(p, "meta"), mapping=meta)
        pipe.hlen(self.key(p, "open"))

    def _account(self, p: int, meta: dict[str, str], b: _Batch, n_open: int) -> None:
        for (counter, *labels), n in b.tally.items():
            counter.labels(*labels).inc(n)
        for imp, label, at in b.rows:
            self.m.rows.labels(str(label)).inc()
            self.m.delay.observe(max(0.0, at - imp["ts"]))
            if self.delays is not None:
                self.delays.append(at - imp["ts"])
        if b.rows:
            self.metrics.events_out.labels(self.topics["train-batches"]).inc(len(b.rows))
        if "wm" in meta:
            self.m.watermark.labels(str(p)).set(float(meta["wm"]))
        self.m.open.labels(str(p)).set(n_open)

    async def _flush(self, p: int) -> None:
        """Apply the partition's counter events and send its outbox in id order, then
        delete what was sent."""
        self._unsent.add(p)
        key = self.key(p, "outbox")
        entries = await self.client.hgetall(key)
        if entries:
            ids = sorted(int(k) for k in entries)
            outputs = [unpack_output(entries[str(i).encode()]) for i in ids]
            counted = [ev for topic, _k, value, _p in outputs if topic == COUNTERS
                       for ev in _dec.decode(value)]
            if counted:  # idempotent per counter sequence number (the store's fence)
                await self.store.apply_batch(self.count_source, p, counted)
            await self.send([o for o in outputs if o[0] != COUNTERS])
            await self.client.hdel(key, *[str(i) for i in ids])
        self._unsent.discard(p)
