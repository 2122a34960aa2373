"""The ``apply_batch`` plan of the online store: read, compute in numpy, write fenced.

One batch of one source partition costs two round trips (three when item attributes
are not cached yet), whatever its size:

1. **read** — one script on the partition's own shard returns the topic's next offset,
   the batch's entities' states and, only when the batch starts below that offset (a
   replay), the replay cache; in the same pipeline, one read script per other shard
   and the guarded user-attribute writes;
2. **compute** — :func:`features.pointintime.replay_states` gives every new event's
   exact pre-event state of the own shard and every touched entity's final state;
   other shards (as of batch start) are decayed to each event's time and added;
3. **write** — one fenced script (``apply.lua``) writes each touched entity's final
   state once (O(distinct entities), not O(events)), the replay-cache entry, and
   advances the next offset; if the next offset moved since step 1, nothing is written
   and the plan starts again from step 1.

Events whose offset is below the recorded next offset were applied before: their
counters do not move again, and their features come back from the replay cache
(exactly the features of the first run, other shards included).
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from features.counters import aggregate, as_columns, decay_state, derive_features, resolve_refs
from features.pointintime import replay_states

if TYPE_CHECKING:
    from features.store import BatchResult, _StoreCore

log = logging.getLogger(__name__)

Plan = Generator[list[tuple[Any, ...]], list[Any], Any]

#: Fenced writes tried before giving up (each failure means another writer moved ahead).
MAX_ATTEMPTS = 5

_MAGIC = b"HWP2"
_HEADER = struct.Struct("<4sIII")  # magic, events, values per event, config signature


class FencedError(RuntimeError):
    """Another writer moved this partition's offset record: this batch was not applied.

    Transient from the caller's view: retry (a worker that lost its partition stops
    receiving it at the next rebalance); never drop the batch.
    """


def config_signature(cfg) -> int:
    """CRC of what shapes a cached entry: an entry of another config is never reused."""
    return zlib.crc32(repr((cfg.feature_names(), cfg.half_lives)).encode())


def encode_entry(sig: int, offsets: np.ndarray, subs: np.ndarray, agg: np.ndarray) -> bytes:
    """Replay-cache entry: per applied event its (offset, sub) and aggregated pre-state."""
    m = len(offsets)
    flat = np.ascontiguousarray(agg, dtype="<f8").reshape(m, -1)
    return b"".join(
        (
            _HEADER.pack(_MAGIC, m, flat.shape[1], sig),
            np.asarray(offsets, "<i8").tobytes(),
            np.asarray(subs, "<i4").tobytes(),
            flat.tobytes(),
        )
    )


def decode_entries(
    entries: list[bytes], sig: int, stride: int
) -> dict[tuple[int, int], np.ndarray]:
    """(offset, sub) → aggregated pre-state, from entries of this config (others ignored)."""
    out: dict[tuple[int, int], np.ndarray] = {}
    for blob in entries:
        if len(blob) < _HEADER.size:
            continue
        magic, m, width, esig = _HEADER.unpack_from(blob)
        if magic != _MAGIC or esig != sig or width != stride:
            continue  # an older format or another counter config: treat as not cached
        pos = _HEADER.size
        offs = np.frombuffer(blob, "<i8", m, pos)
        subs = np.frombuffer(blob, "<i4", m, pos + 8 * m)
        vals = np.frombuffer(blob, "<f8", m * width, pos + 12 * m).reshape(m, width)
        for o, s, v in zip(offs.tolist(), subs.tolist(), vals, strict=True):
            out[(o, s)] = v
    return out


def plan_apply(core: _StoreCore, topic: str, partition: int, events: Any) -> Plan:
    """See the module docstring; returns a :class:`features.store.BatchResult`."""
    from features.store import _APPLY, _READ, _READ_OWN, BatchResult

    cfg = core.counters
    W = cfg.width
    cols = as_columns(events)
    if "offset" not in cols or "label" not in cols:
        raise ValueError("apply_batch needs 'offset' (and 'sub') and 'label' columns")
    n = len(cols["ts"])
    order = np.lexsort((cols["sub"], cols["offset"]))
    srt = {
        k: (v[order] if isinstance(v, np.ndarray) else [v[i] for i in order])
        for k, v in cols.items()
    }
    attrs, codes = yield from core._plan_items(set(srt["item_id"].tolist()))
    refs = resolve_refs(cfg, srt, attrs)
    entities = refs.entities
    own_keys = [core.shard_key(partition, e) for e in entities]
    tag = f"{{{core.prefix}:p{partition}}}"
    offsets_key, pit_key = f"{tag}:offsets", f"{tag}:pit:{topic}"
    fields = cfg.state_fields
    others = [p for p in range(core.partitions) if p != partition] if entities else []
    ts_ref = srt["ts"][refs.event]
    sig = config_signature(cfg)
    stride = refs.n_specs * W
    extra = core._user_attr_cmds(srt)
    min_offset = int(srt["offset"].min()) if n else 0
    for attempt in range(MAX_ATTEMPTS):
        cmds = [
            core._evalsha(
                _READ_OWN, [offsets_key, pit_key, *own_keys], [topic, min_offset, *fields]
            )
        ]
        cmds += [
            core._evalsha(_READ, [core.shard_key(p, e) for e in entities], fields) for p in others
        ]
        res = yield cmds + extra
        extra = []  # guarded attribute writes went out with the first attempt
        nxt_raw, own_blob, cache = res[0]
        nxt = int(nxt_raw)
        new = srt["offset"] >= nxt
        ref_new = new[refs.event]
        ev_new = refs.event[ref_new]
        own = core._states(own_blob, W) if entities else np.zeros((0, W + 1))
        rep = replay_states(
            cfg.half_lives, own, refs.entity[ref_new], srt["ts"][ev_new], srt["label"][ev_new]
        )
        per_ref = np.zeros((len(refs.event), W))
        per_ref[ref_new] = rep.pre
        for blob in res[1 : 1 + len(others)]:
            per_ref += decay_state(cfg, core._states(blob, W)[refs.entity], ts_ref)
        agg = aggregate(refs, per_ref)
        late = np.zeros(n, bool)
        late[ev_new[rep.late]] = True
        valid = np.ones(n, bool)
        dup = ~new
        if dup.any():
            hits = decode_entries(list(cache or []), sig, stride)
            flat = agg.reshape(n, stride)
            for i in np.flatnonzero(dup).tolist():
                row = hits.get((int(srt["offset"][i]), int(srt["sub"][i])))
                if row is None:
                    valid[i] = False
                    flat[i] = 0.0
                else:
                    flat[i] = row
        next_offset = nxt
        if new.any():
            next_offset = int(srt["offset"][new].max()) + 1
            entry = encode_entry(sig, srt["offset"][new], srt["sub"][new], agg[new])
            keys = [own_keys[k] for k in rep.touched.tolist()]
            blob = np.ascontiguousarray(rep.final, dtype="<f8").tobytes()
            (written,) = yield [
                core._evalsha(
                    _APPLY,
                    [offsets_key, pit_key, *keys],
                    [topic, nxt, next_offset, ",".join(fields), blob, entry, core.replay_batches],
                )
            ]
            if not int(written[0]):
                core._fenced.labels(topic).inc()
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
    late_count, dup_count = int(late.sum()), int(dup.sum())
    core._late.labels(topic).inc(late_count)
    core._dupes.labels(topic).inc(dup_count)
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
    )
    return result
