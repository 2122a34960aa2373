"""Read plans of the online store: features for serving and one entity for the CLI.

Both read every partition's shard (decayed to the read time and summed) in one round
trip, plus one for item attributes not in the store's short-lived cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from features.counters import (
    CounterConfig,
    aggregate,
    as_columns,
    decay_shards,
    decay_state,
    derive_features,
    half_life_label,
    smoothed_ctr,
)
from features.hashing import canonical
from features.sequence import plan_user_sequences

if TYPE_CHECKING:
    from features.store_core import Plan, StoreCore

__all__ = ["entity_counters", "entity_kind", "plan_entity", "plan_read", "rows_at",
           "wanted_counters"]


def rows_at(entity_rows: Any, now: float) -> dict[str, Any]:
    """Entity rows (dicts, or columns) as event columns at time ``now``."""
    if isinstance(entity_rows, Mapping):
        n = len(next(iter(entity_rows.values()))) if entity_rows else 0
        return as_columns({**entity_rows, "ts": np.full(n, now)})
    return as_columns([{**r, "ts": now} for r in entity_rows])


def wanted_counters(cfg: CounterConfig, features: Sequence[str] | None
                    ) -> tuple[list[str] | None, CounterConfig]:
    """The counter features asked for (``None``: all) and the counters that hold them;
    ``KeyError`` names unknown ones."""
    extras = ("user_attrs", "item_attrs", "codes")
    wanted = None if features is None else [f for f in features if f not in extras]
    if wanted is None:
        return None, cfg
    unknown = sorted(set(wanted) - set(cfg.feature_names()))
    if unknown:
        raise KeyError(f"unknown features {unknown}; see CounterConfig.feature_names()")
    return wanted, cfg.select(
        [s.name for s in cfg.specs if set(cfg.select([s.name]).feature_names()) & set(wanted)])


def entity_kind(cfg: CounterConfig, entity: str) -> tuple[str, str]:
    """``user:42`` -> ``("user", "42")``; ``ValueError`` unless the kind is a counter."""
    kind, sep, ident = entity.partition(":")
    names = [s.name for s in cfg.specs]
    if not sep or kind not in names:
        raise ValueError(f"entity {entity!r}: expected '<counter>:<id>' with counter in {names}")
    return kind, ident


def entity_counters(cfg: CounterConfig, entity: str, shards: np.ndarray, now: float) -> dict[str, Any]:
    """One entity's counters as ``headwater features get`` shows them, from its state in
    every shard (``[partitions, width + 1]``, ``t`` last), decayed to ``now`` and summed."""
    per_partition = decay_state(cfg, shards, now)
    total = per_partition.sum(axis=0)
    out: dict[str, Any] = {"entity": entity, "as_of": now}
    out["impressions_total"], out["clicks_total"] = int(total[0]), int(total[1])
    out["ctr_total"] = float(smoothed_ctr(cfg, total[1], total[0]))
    for j, h in enumerate(cfg.half_lives):
        lab = half_life_label(h)
        nh, ch = float(total[2 + 2 * j]), float(total[3 + 2 * j])
        out[f"impressions_{lab}"], out[f"clicks_{lab}"] = nh, ch
        out[f"ctr_{lab}"] = float(smoothed_ctr(cfg, ch, nh))
    out["impressions_by_partition"] = {q: int(v) for q, v in enumerate(per_partition[:, 0]) if v}
    ts = shards[:, cfg.width]
    out["updated_at"] = float(np.nanmax(ts)) if np.isfinite(ts).any() else None
    return out


def plan_read(
    core: StoreCore, entity_rows: Any, features: Sequence[str] | None, now: float | None
) -> Plan:
    """See :meth:`features.store.OnlineStore.get_online_features`."""
    from features.store_core import decode_hash

    now = core.clock() if now is None else float(now)
    cols = rows_at(entity_rows, now)
    wanted, cfg = wanted_counters(core.counters, features)
    need_items = features is None or "item_attrs" in features or "codes" in features
    need_items = need_items or any(s.needs_item_attrs for s in cfg.specs)
    attrs, codes = (yield from core.plan_items(set(cols["item_id"]))) if need_items else ({}, {})
    # Serving's reads go through its cache (features/read_cache.py): tracked by Redis,
    # every entity and user's attributes; else shared entities for a TTL. The rest are
    # read from every shard. Entities are numbered by the cache's slots (RequestSlots,
    # a run of rows of one user at a time; also when the cache is off or the read names
    # its features).
    cache = core.read_cache if wanted is None and core.read_cache.enabled else None
    slots = core.read_cache  # numbers entity names, whether it keeps states or not
    slots.prepare()
    refs = core.slots_for(cfg).refs(cols, attrs, slots.slot, slots.generation)
    look, pick = None, None  # the cache's lookup; else which read state each reference takes
    if cache is not None:
        look = cache.lookup(refs.entity, now)
        miss = look.miss
    else:  # by slot, not kept: each distinct entity read once
        read_slots, pick = np.unique(refs.entity, return_inverse=True)
        miss = slots.names_of(read_slots)
    cmds = core.read_cmds(miss, cfg.state_fields)
    n_read = len(cmds)
    users = sorted({u for u in cols["user_id"] if u})
    want_users = features is None or "user_attrs" in features
    user_map: dict[str, dict[str, Any]] = {}  # decoded attributes per user
    read_users: list[tuple[str, str]] = []  # (user, key) to read
    if want_users:
        for u in users:
            key = core.attrs_key("user", u)
            found, kept = (False, None) if cache is None else cache.user(key, now)
            if found:
                user_map[u] = dict(kept)  # the caller's own copy: the cache's is shared
            else:
                read_users.append((u, key))
        cmds += [("HGETALL", key) for _, key in read_users]
    token = cache.begin() if cache is not None and cmds else None
    try:
        res = yield cmds
        shards = core.shard_states(res[:n_read], cfg.width)
        if cache is None:
            per_ref = (decay_shards(cfg, shards, now) if shards
                       else np.zeros((0, cfg.width)))[pick]
        else:  # a state per reference
            per_ref = cache.decayed(look, shards, now, token)
        read_map = {u: decode_hash(r) for (u, _), r in zip(read_users, res[n_read:], strict=True)}
        if cache is not None and read_users:
            cache.remember_users({key: read_map[u] for u, key in read_users}, now, token)
            read_map = {u: dict(a) for u, a in read_map.items()}  # the cache keeps the originals
        user_map.update(read_map)
    finally:
        if cache is not None:
            cache.end(token)
    feats = derive_features(cfg, aggregate(refs, per_ref))
    out: dict[str, Any] = (feats if wanted is None
                           else {k: v for k, v in feats.items() if k in wanted})
    items = cols["item_id"].tolist()
    if want_users:
        out["user_attrs"] = [user_map.get(u) or None for u in cols["user_id"].tolist()]
    if features is None or "item_attrs" in features:
        out["item_attrs"] = [*map(attrs.get, items)]
    if features is None or "codes" in features:
        out["codes"] = [*map(codes.get, items)]
    if core.seq_len and (features is None or "user_seq" in features):
        seqs = yield from plan_user_sequences(core, cols["user_id"], now)
        out["user_seq"] = [seqs.get(canonical(u), ()) if u else () for u in cols["user_id"]]
    return out


def plan_entity(core: StoreCore, entity: str, now: float | None) -> Plan:
    """See :meth:`features.store.OnlineStore.entity_features`."""
    from features.store_core import READ, decode_hash

    now = core.clock() if now is None else float(now)
    kind, ident = entity_kind(core.counters, entity)
    cfg = core.counters
    cmds = [
        core.evalsha(READ, [core.shard_key(p, entity)], cfg.state_fields)
        for p in range(core.partitions)
    ]
    if kind in ("user", "item"):
        cmds.append(("HGETALL", core.attrs_key(kind, ident)))
    if kind == "item":
        cmds.append(("HGETALL", core.codes_key(ident)))
    res = yield cmds
    shards = np.vstack([core.states(b, cfg.width) for b in res[: core.partitions]])
    out = entity_counters(cfg, entity, shards, now)
    if kind in ("user", "item"):
        out["attributes"] = decode_hash(res[core.partitions])
    if kind == "item":
        raw = decode_hash(res[core.partitions + 1])
        out["codes"] = raw.get("codes")
        out["codes_version"] = raw.get("version")
    return out
