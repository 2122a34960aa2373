"""Declarative click counters: what is counted, per which key, and the features derived.

A :class:`CounterSpec` names a counter and the event fields that key it; every click
event adds one impression (and ``label`` clicks) to each entity its key resolves to.
Each entity keeps all-time totals plus exponentially decayed sums for every half-life
of the :class:`CounterConfig` (default 1 h and 1 day), and the smoothed CTR
``(clicks + alpha * prior) / (impressions + alpha)`` is derived from them.

Adding a counter is one line::

    CounterSpec("user", key=("user_id",))
    CounterSpec("user_genre", key=("user_id", "genre"))
    CounterSpec("device", key_from_context="device")

Key fields (see :data:`KEY_FIELDS`): ``user_id``, ``item_id``; ``genre`` and ``tag`` from
the item's attributes (multi-valued: an item in two genres updates two counters, and the
feature read for the event is the sum over them, i.e. the pooled counts of its genres);
``year`` or ``item.<attr>`` from item attributes; ``hour`` and ``weekday`` derived from
the event time (UTC); ``context.<f>`` and ``user.<f>`` from the click's ``context`` and
``user`` objects. An event whose key is missing does not touch that counter.

Decay is linear in the events, so a value is ``sum(x_i * 2 ** (-(t - t_i) / h))``. That is
why a late event can be applied exactly: added with weight ``2 ** (-(t_ref - t_i) / h)``
to a value kept at ``t_ref``, it gives what in-order arrival would have given.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from features.hashing import canonical

__all__ = [
    "DEFAULT_COUNTERS",
    "KEY_FIELDS",
    "CounterConfig",
    "CounterSpec",
    "Refs",
    "aggregate",
    "as_columns",
    "decay_state",
    "derive_features",
    "half_life_label",
    "resolve_refs",
]

KEY_FIELDS = ("user_id", "item_id", "genre", "tag", "year", "hour", "weekday")
_PREFIXED = ("context.", "user.", "item.")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class CounterSpec:
    """One counter family: a name and the event fields that key it.

    Parameters
    ----------
    name : str
        Entity prefix in Redis and feature-name prefix (``user`` → ``user:42``,
        ``user_ctr_1h``).
    key : tuple of str
        Key fields (:data:`KEY_FIELDS` or ``context.<f>``, ``user.<f>``, ``item.<f>``).
        ``()`` is one global counter.
    key_from_context : str, optional
        Shorthand for ``key=("context.<name>",)``.

    >>> CounterSpec("device", key_from_context="device").key
    ('context.device',)
    """

    name: str
    key: tuple[str, ...] = ()
    key_from_context: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"CounterSpec name {self.name!r}: use letters, digits and '_'")
        key = tuple(self.key)
        if self.key_from_context:
            key = key + (f"context.{self.key_from_context}",)
        for f in key:
            if f not in KEY_FIELDS and not f.startswith(_PREFIXED):
                raise ValueError(
                    f"CounterSpec {self.name!r}: unknown key field {f!r}; "
                    f"use one of {KEY_FIELDS} or context.<f>, user.<f>, item.<f>"
                )
        object.__setattr__(self, "key", key)

    @property
    def needs_item_attrs(self) -> bool:
        return any(f in ("genre", "tag", "year") or f.startswith("item.") for f in self.key)


DEFAULT_COUNTERS: tuple[CounterSpec, ...] = (
    CounterSpec("user", key=("user_id",)),
    CounterSpec("item", key=("item_id",)),
    CounterSpec("genre", key=("genre",)),
    CounterSpec("user_genre", key=("user_id", "genre")),
    CounterSpec("hour", key=("hour",)),
    CounterSpec("device", key_from_context="device"),
)


def half_life_label(seconds: float) -> str:
    """Short label of a half-life used in feature names.

    >>> half_life_label(3600), half_life_label(86400), half_life_label(90), half_life_label(1800)
    ('1h', '1d', '90s', '30m')
    """
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class CounterConfig:
    """The counters to keep, their half-lives and CTR smoothing.

    ``prior`` is the CTR an entity with no history gets; ``alpha`` is how many
    impressions the prior is worth.
    """

    specs: tuple[CounterSpec, ...] = DEFAULT_COUNTERS
    half_lives: tuple[float, ...] = (3600.0, 86400.0)
    alpha: float = 5.0
    prior: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", tuple(self.specs))
        object.__setattr__(self, "half_lives", tuple(float(h) for h in self.half_lives))
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"CounterConfig: duplicate counter names in {names}")
        if any(h <= 0 for h in self.half_lives):
            raise ValueError(f"CounterConfig.half_lives must be > 0, got {self.half_lives}")
        if self.alpha <= 0 or not 0.0 <= self.prior <= 1.0:
            raise ValueError("CounterConfig: need alpha > 0 and 0 <= prior <= 1")

    @property
    def width(self) -> int:
        """Values per entity state: totals (n, c) then (n, c) per half-life."""
        return 2 + 2 * len(self.half_lives)

    @property
    def state_fields(self) -> list[str]:
        """Redis hash fields of an entity, in state order, then ``t`` (the decay reference)."""
        out = ["n", "c"]
        for h in self.half_lives:
            out += [f"n@{h:g}", f"c@{h:g}"]
        return out + ["t"]

    def select(self, names: Sequence[str]) -> CounterConfig:
        """The same config restricted to the named counters."""
        by_name = {s.name: s for s in self.specs}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise KeyError(f"unknown counters {missing}; configured: {list(by_name)}")
        return CounterConfig(
            tuple(by_name[n] for n in names), self.half_lives, self.alpha, self.prior
        )

    def feature_names(self) -> list[str]:
        """Derived feature names, spec by spec (see :func:`derive_features`)."""
        out: list[str] = []
        for s in self.specs:
            out += [f"{s.name}_impressions_total", f"{s.name}_clicks_total", f"{s.name}_ctr_total"]
            for h in self.half_lives:
                lab = half_life_label(h)
                out += [
                    f"{s.name}_impressions_{lab}",
                    f"{s.name}_clicks_{lab}",
                    f"{s.name}_ctr_{lab}",
                ]
        return out


def as_columns(events: Any) -> dict[str, Any]:
    """Normalise click events to columns: numpy arrays plus per-event ``context``/``user`` dicts.

    Accepts a mapping of columns, a list of event dicts, or a ``pyarrow`` Table /
    RecordBatch. Flattened ``context.<f>`` / ``user.<f>`` columns are folded into the
    per-event dicts. ``user_id`` and ``item_id`` become canonical strings (``''`` missing).

    >>> c = as_columns([{"ts": 1.0, "user_id": 7, "item_id": "9", "label": 1}])
    >>> c["user_id"].tolist(), c["ts"].dtype.name, c["context"]
    (['7'], 'float64', [None])
    """
    if hasattr(events, "to_pydict"):
        events = events.to_pydict()
    if isinstance(events, Sequence) and not isinstance(events, (str, bytes)):
        rows = list(events)
        keys = {k for r in rows for k in r}
        events = {k: [r.get(k) for r in rows] for k in keys}
    if not isinstance(events, Mapping):
        raise TypeError(f"events must be columns, rows or an Arrow table, got {type(events)!r}")
    if "ts" not in events:
        raise ValueError("events need a 'ts' column (event time, epoch seconds)")
    ts = np.asarray(events["ts"], dtype=np.float64)
    n = len(ts)
    out: dict[str, Any] = {"ts": ts}
    for name in ("user_id", "item_id"):
        col = events.get(name)
        if col is None:
            out[name] = np.full(n, "", dtype=object)
            continue
        arr = np.asarray(col)
        if arr.dtype.kind in "iu":
            out[name] = arr.astype(str).astype(object)
        else:
            out[name] = np.asarray([canonical(v) for v in col], dtype=object)
    if "label" in events:
        out["label"] = np.asarray(events["label"], dtype=np.int8)
    if "offset" in events:
        out["offset"] = np.asarray(events["offset"], dtype=np.int64)
        sub = events.get("sub")
        out["sub"] = np.zeros(n, np.int32) if sub is None else np.asarray(sub, dtype=np.int32)
    if "event_id" in events:
        out["event_id"] = np.asarray([canonical(v) for v in events["event_id"]], dtype=object)
    for obj in ("context", "user"):
        col = events.get(obj)
        dicts: list[dict | None] = (
            [dict(d) if d else None for d in col] if col is not None else [None] * n
        )
        flat = [k for k in events if k.startswith(obj + ".")]
        for k in flat:
            f = k[len(obj) + 1 :]
            for i, v in enumerate(events[k]):
                if v is not None:
                    dicts[i] = {**(dicts[i] or {}), f: v}
        out[obj] = dicts
    for k, v in out.items():
        if len(v) != n:
            raise ValueError(f"events column {k!r} has {len(v)} values, 'ts' has {n}")
    return out


def _item_values(attr: str, item_ids: np.ndarray, item_attrs: Mapping[str, Mapping]) -> list[tuple]:
    """Per-event values of one item attribute, computed once per distinct item."""
    uniq, inverse = np.unique(item_ids.astype(str), return_inverse=True)
    per_item: list[tuple] = []
    for item in uniq:
        attrs = item_attrs.get(item) or {}
        v = attrs.get(attr)
        if v is None and attr == "genres":
            v = attrs.get("tags")  # item events carry genres as tags
        vals = v if isinstance(v, (list, tuple)) else [v]
        per_item.append(tuple(t for t in (canonical(x) for x in vals) if t))
    return [per_item[j] for j in inverse]


def _field_values(
    f: str, cols: Mapping[str, Any], item_attrs: Mapping[str, Mapping]
) -> list[tuple]:
    n = len(cols["ts"])
    if f in ("user_id", "item_id"):
        return [(v,) if v else () for v in cols[f]]
    if f in ("hour", "weekday"):
        days = np.floor(cols["ts"] / 86400.0)
        # 1970-01-01 was a Thursday: weekday 0 = Monday as in datetime.weekday().
        vals = (np.floor(cols["ts"] / 3600.0) % 24) if f == "hour" else ((days + 3) % 7)
        names = np.asarray([str(int(v)) for v in range(24)], dtype=object)
        return [(t,) for t in names[vals.astype(np.int64)]]
    if f in ("genre", "tag", "year") or f.startswith("item."):
        attr = {"genre": "genres", "tag": "tags", "year": "year"}.get(f, f[len("item.") :])
        return _item_values(attr, cols["item_id"], item_attrs)
    obj, name = f.split(".", 1)
    out: list[tuple] = []
    for d in cols.get(obj) or [None] * n:
        t = canonical(d.get(name)) if d else ""
        out.append((t,) if t else ())
    return out


@dataclass
class Refs:
    """Which entities each event touches, ordered by event.

    ``entities`` are distinct entity names (``user:42``); ``event``, ``spec`` and
    ``entity`` are parallel arrays with one entry per (event, entity) reference.
    """

    entities: list[str]
    event: np.ndarray
    spec: np.ndarray
    entity: np.ndarray
    n_events: int
    n_specs: int
    index: dict[str, int] = field(default_factory=dict)


def resolve_refs(
    config: CounterConfig, cols: Mapping[str, Any], item_attrs: Mapping[str, Mapping] | None = None
) -> Refs:
    """Resolve every spec's key for every event into entity references.

    >>> cfg = CounterConfig(specs=(CounterSpec("user", key=("user_id",)),
    ...                            CounterSpec("user_genre", key=("user_id", "genre"))))
    >>> cols = as_columns({"ts": [0.0], "user_id": [7], "item_id": [9]})
    >>> r = resolve_refs(cfg, cols, {"9": {"genres": ["Comedy", "Drama"]}})
    >>> [r.entities[i] for i in r.entity]
    ['user:7', 'user_genre:7|Comedy', 'user_genre:7|Drama']
    """
    item_attrs = item_attrs or {}
    n = len(cols["ts"])
    values: dict[str, list[tuple]] = {}
    index: dict[str, int] = {}
    ev: list[int] = []
    sp: list[int] = []
    ent: list[int] = []
    for s, spec in enumerate(config.specs):
        for f in spec.key:
            if f not in values:
                values[f] = _field_values(f, cols, item_attrs)
        prefix = f"{spec.name}:" if spec.key else spec.name
        lists = [values[f] for f in spec.key]
        for i in range(n):
            parts = [lst[i] for lst in lists]
            combos = [p[0] for p in parts] if len(parts) == 1 and len(parts[0]) == 1 else None
            if combos is not None:
                names = [prefix + combos[0]]
            else:
                names = [prefix + "|".join(c) for c in itertools.product(*parts)]
            for name in names:
                ev.append(i)
                sp.append(s)
                ent.append(index.setdefault(name, len(index)))
    event = np.asarray(ev, dtype=np.int64)
    order = np.argsort(event, kind="stable")
    return Refs(
        entities=list(index),
        event=event[order],
        spec=np.asarray(sp, dtype=np.int32)[order],
        entity=np.asarray(ent, dtype=np.int32)[order],
        n_events=n,
        n_specs=len(config.specs),
        index=index,
    )


def decay_state(config: CounterConfig, state: np.ndarray, at: np.ndarray | float) -> np.ndarray:
    """Decay stored states ``[K, width + 1]`` (last column ``t``) to times ``at``.

    Never decays backwards: a state newer than ``at`` is returned as stored. ``t`` NaN
    (an entity never written, whose fields read as 0) is not decayed.
    """
    out = np.array(state[:, : config.width], dtype=np.float64, copy=True)
    t = state[:, config.width]
    dt = np.nan_to_num(np.maximum(np.asarray(at, dtype=np.float64) - t, 0.0), nan=0.0)
    for j, h in enumerate(config.half_lives):
        f = np.exp2(-dt / h)
        out[:, 2 + 2 * j] *= f
        out[:, 3 + 2 * j] *= f
    return out


def aggregate(refs: Refs, per_ref: np.ndarray) -> np.ndarray:
    """Sum per-reference states into ``[n_events, n_specs, width]`` (pools multi-valued keys)."""
    width = per_ref.shape[1]
    out = np.zeros((refs.n_events * refs.n_specs, width), dtype=np.float64)
    np.add.at(out, refs.event * refs.n_specs + refs.spec, per_ref)
    return out.reshape(refs.n_events, refs.n_specs, width)


def derive_features(config: CounterConfig, agg: np.ndarray) -> dict[str, np.ndarray]:
    """Named features from aggregated states ``[n, n_specs, width]``.

    >>> cfg = CounterConfig(specs=(CounterSpec("item", key=("item_id",)),), half_lives=(3600,))
    >>> f = derive_features(cfg, np.array([[[10.0, 5.0, 2.0, 1.0]]]))
    >>> float(f["item_ctr_total"][0]), float(f["item_impressions_1h"][0])
    (0.5, 2.0)
    """
    a, p = config.alpha, config.prior
    out: dict[str, np.ndarray] = {}
    for s, spec in enumerate(config.specs):
        n, c = agg[:, s, 0], agg[:, s, 1]
        out[f"{spec.name}_impressions_total"] = n
        out[f"{spec.name}_clicks_total"] = c
        out[f"{spec.name}_ctr_total"] = (c + a * p) / (n + a)
        for j, h in enumerate(config.half_lives):
            lab = half_life_label(h)
            nh, ch = agg[:, s, 2 + 2 * j], agg[:, s, 3 + 2 * j]
            out[f"{spec.name}_impressions_{lab}"] = nh
            out[f"{spec.name}_clicks_{lab}"] = ch
            out[f"{spec.name}_ctr_{lab}"] = (ch + a * p) / (nh + a)
    return out
