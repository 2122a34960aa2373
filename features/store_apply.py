"""The ``apply_batch`` plan of the online store: read, compute in numpy, write fenced.

One batch of one source partition costs two round trips (three when item attributes
are not cached yet), whatever its size:

1. **read** — one script on the partition's own shard returns the topic's next offset,
   the batch's entities' states and, only when the batch starts below that offset (a
   replay), the replay cache; in the same pipeline, one read script per other shard
   and the guarded user-attribute writes;
2. **compute** — every new event's pre-event state is **strictly point in time**
   (:mod:`features.asof`, docs/point-in-time.md): from every shard, only contributions
   with event time before the event's (``pit_ties``: or equal). A shard's state answers
   alone when it is older than the event; otherwise its entity's history (read in the
   same round trip for entities whose ``t`` is not older than the batch's first event)
   does. :func:`features.pointintime.replay_states` gives every touched entity's final
   state;
3. **write** — one fenced script (``apply.lua``) writes each touched entity's final
   state and appends the batch's events to its history once (O(distinct entities), not
   O(events)), the replay-cache entry, and advances the next offset; if the next offset
   moved since step 1, nothing is written and the plan starts again from step 1.

Events whose offset is below the recorded next offset were applied before: their
counters do not move again, and their features come back from the replay cache
(exactly the features of the first run, other shards included).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from features.asof import add_others, pre_others, pre_own
from features.counters import aggregate, as_columns, derive_features, resolve_refs
from features.pointintime import replay_states
from features.sequence import plan_sequences

if TYPE_CHECKING:
    from features.store_core import BatchResult, StoreCore

log = logging.getLogger(__name__)

Plan = Generator[list[tuple[Any, ...]], list[Any], Any]

#: Fenced writes tried before giving up (each failure means another writer moved ahead).
MAX_ATTEMPTS = 5

_MAGIC = b"HWP3"
_HEADER = struct.Struct("<4sIII")  # magic, events, values per event, config signature


class GapError(RuntimeError):
    """The partition's recorded next offset is behind what the caller knows was applied.

    Redis lost writes (a crash inside the AOF fsync window, a restore from an older
    copy): the messages from ``recorded`` on must be read back from the log and applied
    before this batch. Nothing was written.
    """

    def __init__(self, topic: str, partition: int, recorded: int, expected: int) -> None:
        super().__init__(
            f"{topic}[{partition}]: Redis records next offset {recorded}, "
            f"but offsets up to {expected} were applied: Redis lost writes"
        )
        self.recorded = recorded
        self.expected = expected


class RewindError(RuntimeError):
    """Offsets Redis recorded as applied now hold other events: the log was reset.

    Applying would count nothing and hand out features cached for the other events, so
    the partition must stop until the state and the log agree again.
    """

    def __init__(self, topic: str, partition: int, offset: int, recorded: int) -> None:
        super().__init__(
            f"{topic}[{partition}]: REWIND: offset {offset} holds another event than the one "
            f"Redis applied there (Redis records next offset {recorded}): the broker's log was "
            f"reset or replaced while Redis kept its state. Run `headwater reset` (wipes Redis, "
            f"the model store and the broker's log) and replay."
        )
        self.offset = offset
        self.recorded = recorded


def event_id_hashes(event_ids) -> np.ndarray:
    """64-bit FNV-1a of each event id's UTF-8 bytes (vectorised over events).

    The hash of an id does not depend on the other ids of the batch:

    >>> h = event_id_hashes(["a", "b", "a"])
    >>> bool(h[0] == h[2]), bool(h[0] != h[1]), h.dtype.name
    (True, True, 'uint64')
    >>> bool(event_id_hashes(["a"])[0] == event_id_hashes(["a", "a-much-longer-id"])[0])
    True
    """
    raw = np.array([str(e).encode() for e in event_ids], dtype=np.bytes_)
    h = np.full(len(raw), 0xCBF29CE484222325, np.uint64)
    if not len(raw) or raw.itemsize == 0:
        return h
    lengths = np.char.str_len(raw)
    chars = raw.view(np.uint8).reshape(len(raw), raw.itemsize).astype(np.uint64)
    prime = np.uint64(0x100000001B3)
    for j, col in enumerate(chars.T):
        h = np.where(lengths > j, (h ^ col) * prime, h)
    return h


class FencedError(RuntimeError):
    """Another writer moved this partition's offset record: this batch was not applied.

    Transient from the caller's view: retry (a worker that lost its partition stops
    receiving it at the next rebalance); never drop the batch.
    """


def config_signature(cfg) -> int:
    """CRC of what shapes a cached entry: an entry of another config is never reused."""
    return zlib.crc32(repr((cfg.feature_names(), cfg.half_lives)).encode())


def encode_entry(
    sig: int, offsets: np.ndarray, subs: np.ndarray, agg: np.ndarray, ids: np.ndarray
) -> bytes:
    """Replay-cache entry: per applied event its (offset, sub), event-id hash
    (:func:`event_id_hashes`) and aggregated pre-state."""
    m = len(offsets)
    flat = np.ascontiguousarray(agg, dtype="<f8").reshape(m, -1)
    return b"".join(
        (
            _HEADER.pack(_MAGIC, m, flat.shape[1], sig),
            np.asarray(offsets, "<i8").tobytes(),
            np.asarray(subs, "<i4").tobytes(),
            np.asarray(ids, "<u8").tobytes(),
            flat.tobytes(),
        )
    )


def decode_entries(
    entries: list[bytes], sig: int, stride: int
) -> dict[tuple[int, int], tuple[int, np.ndarray]]:
    """(offset, sub) → (event-id hash, aggregated pre-state), from entries of this config
    (others ignored)."""
    out: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
    for blob in entries:
        if len(blob) < _HEADER.size:
            continue
        magic, m, width, esig = _HEADER.unpack_from(blob)
        if magic != _MAGIC or esig != sig or width != stride:
            continue  # an older format or another counter config: treat as not cached
        pos = _HEADER.size
        offs = np.frombuffer(blob, "<i8", m, pos)
        subs = np.frombuffer(blob, "<i4", m, pos + 8 * m)
        ids = np.frombuffer(blob, "<u8", m, pos + 12 * m)
        vals = np.frombuffer(blob, "<f8", m * width, pos + 20 * m).reshape(m, width)
        for o, s, h, v in zip(offs.tolist(), subs.tolist(), ids.tolist(), vals, strict=True):
            out[(o, s)] = (h, v)
    return out


def batch_in_offset_order(events: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """A batch's columns sorted by (offset, sub), and the order that sorted them (input
    index per sorted event); ``ValueError`` without ``offset`` or ``label``."""
    cols = as_columns(events)
    if "offset" not in cols or "label" not in cols:
        raise ValueError("apply_batch needs 'offset' (and 'sub') and 'label' columns")
    order = np.lexsort((cols["sub"], cols["offset"]))
    if (order == np.arange(len(order))).all():  # in order already (a take usually is)
        return order, {k: (v.copy() if isinstance(v, np.ndarray) else list(v))
                       for k, v in cols.items()}
    idx = order.tolist()
    return order, {k: (v[order] if isinstance(v, np.ndarray) else [v[i] for i in idx])
                   for k, v in cols.items()}


def plan_apply(
    core: StoreCore, topic: str, partition: int, events: Any, expect_next: int | None = None
) -> Plan:
    """See the module docstring; returns a :class:`features.store.BatchResult`.

    ``expect_next``: the caller knows the partition's next offset was at least this (its
    own last write, or the batch's first offset); a smaller recorded one raises
    :class:`GapError` before anything is written.
    """
    from features.store_core import APPLY, BatchResult

    cfg = core.counters
    W = cfg.width
    order, srt = batch_in_offset_order(events)
    n = len(order)
    # Item attributes (genre counters need them) travel with the first read: refs are
    # resolved from the attributes cached here, and only if an item asked about turns
    # out to have other attributes are they resolved again and read again (the entities
    # just read are in the shard cache by then, so that read is small). When most items
    # asked about lately did have attributes, they are asked first (one more round trip).
    now = core.clock()
    want = {i for i in srt["item_id"].tolist() if i}
    miss = core.items_miss(want, now)
    needs_attrs = any(s.needs_item_attrs for s in cfg.specs)
    if miss and needs_attrs and core.items_found > 0.5:
        # Most items asked about lately had attributes: resolving twice would cost more
        # than the round trip, so ask first (as the serving reads do).
        core.items_take(miss, (yield core.items_cmds(miss)), now)
        miss = []
    attrs, codes = core.items_out(want)
    refs = resolve_refs(cfg, srt, attrs)
    tag = f"{{{core.prefix}:p{partition}}}"
    offsets_key, pit_key = f"{tag}:offsets", f"{tag}:pit:{topic}"
    fields = cfg.state_fields
    sig = config_signature(cfg)
    stride = refs.n_specs * W
    item_cmds = core.items_cmds(miss)
    extra = item_cmds + core.user_attr_cmds(srt)
    min_offset = int(srt["offset"].min()) if n else 0
    for attempt in range(MAX_ATTEMPTS):
        while True:
            entities = refs.entities
            own_keys = [core.shard_key(partition, e) for e in entities]
            others = [p for p in range(core.partitions) if p != partition] if entities else []
            ts_ref = srt["ts"][refs.event]
            read, replies = yield from _read_batch_start(
                core, topic, partition, srt, refs, others, extra, min_offset
            )
            extra = []  # item reads and guarded attribute writes went out once
            if not item_cmds:
                break
            core.items_take(miss, replies[: len(item_cmds)], now)
            item_cmds = []
            seen = attrs
            attrs, codes = core.items_out(want)
            if not needs_attrs or all(attrs.get(i) is seen.get(i) for i in miss):
                break
            refs = resolve_refs(cfg, srt, attrs)
        nxt, cache, states, hists = read
        if expect_next is not None and nxt < expect_next:
            raise GapError(topic, partition, nxt, expect_next)
        own, per_ref, rep, ref_new, ev_new, truncated = _pre_states(
            cfg, srt, refs, partition, others, nxt, states, hists, ts_ref, core.pit_ties
        )
        extra = []  # guarded attribute writes went out with the first attempt
        new = srt["offset"] >= nxt
        agg = aggregate(refs, per_ref)
        late = np.zeros(n, bool)
        late[ev_new[rep.late]] = True
        valid = np.ones(n, bool)
        dup = ~new
        ids = event_id_hashes(srt["event_id"]) if "event_id" in srt else np.zeros(n, np.uint64)
        if dup.any():
            # A replayed event gets the features cached for it, verified by its id: an
            # offset that now holds another event means the log was reset (a REWIND).
            hits = decode_entries(list(cache or []), sig, stride)
            flat = agg.reshape(n, stride)
            for i in np.flatnonzero(dup).tolist():
                hit = hits.get((int(srt["offset"][i]), int(srt["sub"][i])))
                if hit is None:
                    valid[i] = False
                    flat[i] = 0.0
                elif hit[0] != int(ids[i]):
                    raise RewindError(topic, partition, int(srt["offset"][i]), nxt)
                else:
                    flat[i] = hit[1]
        next_offset = nxt
        if new.any():
            next_offset = int(srt["offset"][new].max()) + 1
            entry = encode_entry(sig, srt["offset"][new], srt["sub"][new], agg[new], ids[new])
            keys = [own_keys[k] for k in rep.touched.tolist()]
            keys += [core.history_key(partition, entities[k]) for k in rep.touched.tolist()]
            blob = np.ascontiguousarray(rep.final, dtype="<f8").tobytes()
            token = os.urandom(12).hex()
            args = [topic, nxt, next_offset, ",".join(fields), blob, entry, core.replay_batches]
            hist_counts, hist_entries = _history_entries(rep, refs, ref_new, srt, ev_new)
            hl = ",".join(f"{h:.17g}" for h in cfg.half_lives)
            (written,) = yield [
                core.evalsha(
                    APPLY,
                    [offsets_key, pit_key, f"{tag}:writer", *keys],
                    [*args, token, hist_counts, hist_entries, hl, core.pit_history],
                )
            ]
            if int(written[0]):
                # Unchanged since the read (the fence), so every state read or cached is
                # still the shard's, the touched ones as just written.
                own[rep.touched] = rep.final
                version = (token.encode(), str(next_offset).encode())
                core.shard_cache.put(partition, version, entities, own)
            else:
                core.fenced_writes.labels(topic).inc()
                core.shard_cache.forget(partition)
                log.warning(
                    "%s[%d]: next offset moved from %d to %s while the batch was computed "
                    "(another writer); re-reading (attempt %d)",
                    topic,
                    partition,
                    nxt,
                    written[1].decode(),
                    attempt + 1,
                )
                continue
        break
    else:
        raise FencedError(
            f"{topic}[{partition}]: the recorded next offset kept moving during "
            f"{MAX_ATTEMPTS} attempts: another worker is writing this partition's shard"
        )
    feats = derive_features(cfg, agg)
    back = np.argsort(order)
    sequences = None
    if core.seq_len:
        in_order = yield from plan_sequences(core, partition, srt)
        sequences = [in_order[b] for b in back.tolist()]
    late_count, dup_count = int(late.sum()), int(dup.sum())
    core.late_events.labels(topic).inc(late_count)
    core.truncated_events.labels(topic).inc(truncated)
    core.duplicate_events.labels(topic).inc(dup_count)
    result: BatchResult = BatchResult(
        features={k: v[back] for k, v in feats.items()},
        valid=valid[back],
        replayed=dup[back],
        late=late[back],
        late_count=late_count,
        duplicate_count=dup_count,
        next_offset=next_offset,
        item_attrs=attrs,
        codes=codes,
        sequences=sequences,
    )
    return result


def _entity_times(refs, ts_ref) -> np.ndarray:
    """Per entity, the earliest time of the batch's rows that read it: an entity whose
    state is not older than that needs its history (features/asof.py)."""
    lo = np.full(len(refs.entities), np.inf)
    np.minimum.at(lo, refs.entity, ts_ref)
    return lo


def _read_batch_start(
    core: StoreCore, topic, partition, srt, refs, others, extra, min_offset
) -> Plan:
    """Round trip 1: the own shard's next offset, states and replay cache, other shards.

    Only entities not in the store's shard cache are read; each read returns its shard's
    version, and a cached state counts only at the same version (else that shard is read
    again in full, one more round trip). Cached entities whose ``t`` is not older than
    the earliest row reading them are read again: their histories come with the read. ``extra`` commands
    ride with the first round trip. Returns ``((next offset, replay-cache entries,
    states per shard, histories per shard), extra replies)``; states are per entity of
    ``refs``, ``t`` last; histories map an entity index to its ``h`` field.
    """
    from features.store_core import READ_OWN, READ_SHARD

    cfg = core.counters
    W = cfg.width
    entities = refs.entities
    fields = cfg.state_fields
    sc = core.shard_cache
    tag = f"{{{core.prefix}:p{partition}}}"
    shards = [partition, *others]
    lo = _entity_times(refs, srt["ts"][refs.event])
    snaps = {q: sc.snapshot(q, entities, lo) for q in shards}
    full: set[int] = set()  # shards whose cached part was stale: read every key
    states: dict[int, np.ndarray] = {}
    hists: dict[int, dict[int, bytes]] = {}
    wanted: dict[int, np.ndarray] = {}
    nxt, cache = 0, None
    extra_replies: list[Any] = []
    while len(states) < len(shards):
        cmds, order = [], []
        for q in shards:
            if q in states:
                continue
            want = np.arange(len(entities)) if q in full else snaps[q].missing
            wanted[q] = want
            keys = [core.shard_key(q, entities[k]) for k in want.tolist()]
            keys += [core.history_key(q, entities[k]) for k in want.tolist()]
            ts_arg = lo[want].astype("<f8").tobytes()
            if q == partition:
                cmd = core.evalsha(
                    READ_OWN,
                    [f"{tag}:offsets", f"{tag}:pit:{topic}", f"{tag}:writer", *keys],
                    [topic, min_offset, ts_arg, *fields],
                )
            else:
                qt = f"{{{core.prefix}:p{q}}}"
                cmd = core.evalsha(
                    READ_SHARD,
                    [f"{qt}:writer", f"{qt}:offsets", *keys],
                    [topic, ts_arg, *fields],
                )
            cmds.append(cmd)
            order.append(q)
        res = yield cmds + extra
        if extra:
            extra_replies = res[len(cmds) :]
        extra = []
        for q, reply in zip(order, res, strict=False):
            if q == partition:
                nxt_raw, blob, cache, writer, hist = reply
                nxt = int(nxt_raw)
                version = (writer, nxt_raw)
            else:
                writer, nxt_raw, blob, hist = reply
                version = (writer, nxt_raw)
            want = wanted[q]
            hists[q] = {int(want[i]): h for i, h in zip(hist[0::2], hist[1::2], strict=True)}
            fresh = core.states(blob, W)
            if q in full:
                got = np.array(fresh)
                sc.put(q, version, entities, got)
            else:
                got = sc.assemble(q, entities, snaps[q], version, fresh)
            if got is None:
                full.add(q)
            else:
                states[q] = got
    return (nxt, cache, states, hists), extra_replies


def _pre_states(cfg, srt, refs, partition, others, nxt, states, hists, ts_ref, ties):
    """Every reference's strictly point-in-time pre-event state, summed over shards
    (:mod:`features.asof`), and the own shard's replay (final states, late flags).
    Returns ``(own, per_ref, rep, ref_new, ev_new, truncated references)``."""
    W = cfg.width
    own = states[partition] if len(refs.entities) else np.zeros((0, W + 1))
    new = srt["offset"] >= nxt
    ref_new = new[refs.event]
    ev_new = refs.event[ref_new]
    ent_new, ts_new, lab_new = refs.entity[ref_new], srt["ts"][ev_new], srt["label"][ev_new]
    imp_new = event_impressions(srt)[ev_new]
    rep = replay_states(cfg.half_lives, own, ent_new, ts_new, lab_new, weight=imp_new)
    per_ref = np.zeros((len(refs.event), W))
    pre, trunc = pre_own(cfg.half_lives, own, hists.get(partition, {}), ent_new, ts_new,
                         lab_new, ties, replayed=rep.pre, weight=imp_new)
    per_ref[ref_new] = pre
    truncated = int(trunc.sum())
    if others:
        pre, trunc = pre_others(cfg.half_lives, [states[q] for q in others],
                                [hists.get(q, {}) for q in others], refs.entity[ref_new],
                                ts_ref[ref_new], ties)
        add_others(per_ref, np.flatnonzero(ref_new), pre)
        truncated += int(trunc.sum())
    return own, per_ref, rep, ref_new, ev_new, truncated


def event_impressions(srt: dict[str, Any]) -> np.ndarray:
    """Impressions each event adds: its ``impressions`` column, else 1 (a labelled event).

    >>> event_impressions({"ts": np.zeros(2)}).tolist()
    [1.0, 1.0]
    """
    imp = srt.get("impressions")
    return np.ones(len(srt["ts"])) if imp is None else np.asarray(imp, np.float64)


def _history_entries(rep, refs, ref_new, srt, ev_new) -> tuple[bytes, bytes]:
    """``apply.lua``'s history arguments: per touched entity (``rep.touched`` order) its
    entry count (int32), then the entries ``(ts, impressions, clicks)``, entity by entity,
    offset order."""
    ent = refs.entity[ref_new]
    order = np.argsort(ent, kind="stable")
    counts = np.unique(ent, return_counts=True)[1] if len(ent) else np.zeros(0, np.int64)
    ev = ev_new[order]
    entries = np.column_stack([srt["ts"][ev], event_impressions(srt)[ev], srt["label"][ev]])
    return counts.astype("<i4").tobytes(), entries.astype("<f8").tobytes()


