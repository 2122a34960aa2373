"""Declarative click counters: what is counted, per which key, and the features derived.

A :class:`CounterSpec` names a counter and the event fields that key it; every click
event adds one impression (and ``label`` clicks) to each entity its key resolves to. An
event may say it adds no impression (column ``impressions``: 1, the default, or 0): the
online joiner counts an impression when it is shown and its click, later, at the click's
own time (``impressions`` 0, ``label`` 1).
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

import functools
import itertools
import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from features.hashing import canonical, factorize
from features.item_table import ItemTable

__all__ = [
    "DEFAULT_COUNTERS",
    "KEY_FIELDS",
    "CounterConfig",
    "CounterSpec",
    "DerivedFeatures",
    "Refs",
    "RequestSlots",
    "aggregate",
    "as_columns",
    "decay_shards",
    "decay_state",
    "derive_features",
    "half_life_label",
    "smoothed_ctr",
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
        return any(map(_item_attr_field, self.key))


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

    @functools.cached_property
    def state_fields(self) -> tuple[str, ...]:
        """Redis hash fields of an entity, in state order, then ``t`` (the decay reference)."""
        out = ["n", "c"]
        for h in self.half_lives:
            out += [f"n@{h:g}", f"c@{h:g}"]
        return (*out, "t")

    @functools.cached_property
    def column_half_lives(self) -> np.ndarray:
        """Per state column, the half-life that decays it (``inf``: the totals, never)."""
        out = np.repeat([np.inf, *self.half_lives], 2)
        out.flags.writeable = False
        return out

    @functools.cached_property
    def feature_names_in_layout(self) -> tuple[str, ...]:
        """:meth:`feature_names` as a tuple, named once per config (not per read)."""
        return tuple(self.feature_names())

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
    >>> as_columns([{"ts": 1.0, "label": 1, "impressions": 0}])["impressions"].tolist()
    [0.0]
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
        out[name] = _canonical_column(col)
    if "label" in events:
        out["label"] = np.asarray(events["label"], dtype=np.int8)
    if "impressions" in events:
        imp = np.asarray(events["impressions"], dtype=np.float64)
        if not np.isin(imp, (0.0, 1.0)).all():
            raise ValueError("events column 'impressions' must hold 0 or 1 per event")
        out["impressions"] = imp
    if "offset" in events:
        out["offset"] = np.asarray(events["offset"], dtype=np.int64)
        sub = events.get("sub")
        out["sub"] = np.zeros(n, np.int32) if sub is None else np.asarray(sub, dtype=np.int32)
    if "event_id" in events:
        out["event_id"] = _canonical_column(events["event_id"])
    for obj in ("context", "user"):
        col = events.get(obj)
        # Not copied: folding flattened columns below builds new dicts, never mutates.
        dicts: list[dict | None] = [d or None for d in col] if col is not None else [None] * n
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


def _canonical_column(col: Any) -> np.ndarray:
    """Canonical text of every value as an object array; one ``canonical`` per distinct value."""
    if isinstance(col, np.ndarray) and col.dtype == object and col.size:
        items = col.tolist()
        if set(map(type, items)) == {str}:
            return col  # already canonical: skip the per-value work
    elif isinstance(col, list) and 0 < len(col) <= 8 and all(type(v) is str for v in col):
        return np.array(col, dtype=object)  # a scoring request's few ids: texts already
    codes, texts = factorize(col)
    return np.asarray(texts, dtype=object)[codes] if texts else np.zeros(0, dtype=object)


@dataclass
class _FieldValues:
    """One key field's values for every event, CSR style: event ``e`` has ``counts[e]``
    values, ``codes[starts[e]:starts[e] + counts[e]]``, indices into ``texts``."""

    counts: np.ndarray
    codes: np.ndarray
    texts: list[str]

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.counts) - self.counts


def _present(codes: np.ndarray, texts: list[str]) -> _FieldValues:
    """Single-valued field: ``''`` (missing) gives an event no value."""
    ok = np.asarray([t != "" for t in texts], dtype=bool)[codes] if texts else codes.astype(bool)
    return _FieldValues(ok.astype(np.int64), codes[ok], texts)


def _item_attr_field(f: str) -> bool:
    """Whether key field ``f`` is read from the item's attributes (``genre``, ``item.studio``)."""
    return f in ("genre", "tag", "year") or f.startswith("item.")


def _item_side(f: str) -> bool:
    """Whether key field ``f`` comes from the item (its id or attributes)."""
    return f == "item_id" or _item_attr_field(f)


def _item_attr(f: str) -> str:
    """The item attribute a key field reads: ``genre`` → ``genres``, ``item.studio`` → ``studio``."""
    return {"genre": "genres", "tag": "tags", "year": "year"}.get(f, f[len("item."):])


def _item_field_texts(attr: str, attrs: Mapping[str, Any] | None) -> list[str]:
    """One item's non-missing texts of attribute ``attr`` (``genres`` falls back to
    ``tags``, which item events carry); both resolvers take an item's values from here."""
    attrs = attrs or {}
    v = attrs.get(attr)
    if v is None and attr == "genres":
        v = attrs.get("tags")
    return [t for t in (canonical(x) for x in (v if isinstance(v, (list, tuple)) else [v])) if t]


def _item_values(
    attr: str, items: tuple[np.ndarray, list[str]], item_attrs: Mapping[str, Mapping]
) -> _FieldValues:
    """Per-event values of one item attribute, computed once per distinct item."""
    item_codes, items = items
    vocab: dict[str, int] = {}
    per_item_counts = np.zeros(len(items), np.int64)
    flat: list[int] = []
    for j, item in enumerate(items):
        vals = _item_field_texts(attr, item_attrs.get(item))
        per_item_counts[j] = len(vals)
        flat += [vocab.setdefault(t, len(vocab)) for t in vals]
    flat_arr = np.asarray(flat, dtype=np.int64)
    counts = per_item_counts[item_codes]
    item_starts = np.cumsum(per_item_counts) - per_item_counts
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    codes = flat_arr[np.repeat(item_starts[item_codes], counts) + within]
    return _FieldValues(counts, codes, list(vocab))


_HOURS = [str(v) for v in range(24)]


def _field_values(
    f: str, cols: Mapping[str, Any], item_attrs: Mapping[str, Mapping], ids: dict[str, Any]
) -> _FieldValues:
    """``ids`` caches the factorised ``user_id``/``item_id`` columns across fields."""
    n = len(cols["ts"])
    for name in ("user_id", "item_id"):
        if f == name or (name == "item_id" and _item_attr_field(f)):
            if name not in ids:
                ids[name] = factorize(cols[name])
    if f in ("user_id", "item_id"):
        return _present(*ids[f])
    if f in ("hour", "weekday"):
        days = np.floor(cols["ts"] / 86400.0)
        # 1970-01-01 was a Thursday: weekday 0 = Monday as in datetime.weekday().
        vals = (np.floor(cols["ts"] / 3600.0) % 24) if f == "hour" else ((days + 3) % 7)
        return _FieldValues(np.ones(n, np.int64), vals.astype(np.int64), _HOURS)
    if _item_attr_field(f):
        return _item_values(_item_attr(f), ids["item_id"], item_attrs)
    obj, name = f.split(".", 1)
    dicts = cols.get(obj) or [None] * n
    return _present(*factorize([d.get(name) if d else None for d in dicts]))


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


def _spec_refs(
    spec: CounterSpec, n: int, values: Mapping[str, _FieldValues]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(event, local entity) per reference of one spec, and the spec's entity names.

    Multi-valued keys expand to the product of their values, first field major (as
    ``itertools.product``); entity names are built once per distinct key, not per event.
    """
    if not spec.key:
        return np.arange(n, dtype=np.int64), np.zeros(n, np.int64), [spec.name]
    ev = np.arange(n, dtype=np.int64)
    digits: list[np.ndarray] = []
    for f in spec.key:
        fv = values[f]
        rep = fv.counts[ev]
        within = np.arange(int(rep.sum())) - np.repeat(np.cumsum(rep) - rep, rep)
        digits = [d.repeat(rep) for d in digits]
        digits.append(fv.codes[np.repeat(fv.starts[ev], rep) + within])
        ev = ev.repeat(rep)
    sizes = [max(len(values[f].texts), 1) for f in spec.key]
    if float(np.prod(np.asarray(sizes, dtype=np.float64))) < 2.0**62:
        comp = np.zeros(len(ev), np.int64)
        for d, size in zip(digits, sizes, strict=True):
            comp = comp * size + d
        uniq, local = np.unique(comp, return_inverse=True)
        udigits = []
        for size in reversed(sizes):
            udigits.append(uniq % size)
            uniq = uniq // size
        udigits.reverse()
    else:
        stacked = np.column_stack(digits)
        ustack, local = np.unique(stacked, axis=0, return_inverse=True)
        udigits = [ustack[:, j] for j in range(len(digits))]
    # Entities in order of first reference (stable names → indices across runs of a batch).
    local = local.reshape(-1).astype(np.int64)
    first = np.full(len(udigits[0]), len(local), np.int64)
    np.minimum.at(first, local, np.arange(len(local)))
    by_first = np.argsort(first, kind="stable")
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(len(by_first))
    local = rank[local]
    udigits = [d[by_first] for d in udigits]
    texts = [values[f].texts for f in spec.key]
    prefix = f"{spec.name}:"
    if len(texts) == 1:  # one key field: no join per entity
        (t0,) = texts
        names = [prefix + t0[c] for c in udigits[0].tolist()]
    else:
        names = [
            prefix + "|".join(t[c] for t, c in zip(texts, combo, strict=True))
            for combo in zip(*(d.tolist() for d in udigits), strict=True)
        ]
    return ev, local, names


def resolve_refs(
    config: CounterConfig, cols: Mapping[str, Any], item_attrs: Mapping[str, Mapping] | None = None
) -> Refs:
    """Resolve every spec's key for every event into entity references.

    Vectorised: keys are factorised per field and combined as integer codes, so the
    Python work is per distinct value and per distinct entity, not per event.

    >>> cfg = CounterConfig(specs=(CounterSpec("user", key=("user_id",)),
    ...                            CounterSpec("user_genre", key=("user_id", "genre"))))
    >>> cols = as_columns({"ts": [0.0], "user_id": [7], "item_id": [9]})
    >>> r = resolve_refs(cfg, cols, {"9": {"genres": ["Comedy", "Drama"]}})
    >>> [r.entities[i] for i in r.entity]
    ['user:7', 'user_genre:7|Comedy', 'user_genre:7|Drama']
    """
    item_attrs = item_attrs or {}
    n = len(cols["ts"])
    values: dict[str, _FieldValues] = {}
    ids: dict[str, Any] = {}
    names: list[str] = []
    evs, sps, ents = [], [], []
    for s, spec in enumerate(config.specs):
        for f in spec.key:
            if f not in values:
                values[f] = _field_values(f, cols, item_attrs, ids)
        ev, local, spec_names = _spec_refs(spec, n, values)
        evs.append(ev)
        sps.append(np.full(len(ev), s, np.int32))
        ents.append(local + len(names))
        names += spec_names
    event = np.concatenate(evs) if evs else np.zeros(0, np.int64)
    order = np.argsort(event, kind="stable")
    return Refs(
        entities=names,
        event=event[order],
        spec=(np.concatenate(sps) if sps else np.zeros(0, np.int32))[order],
        entity=(np.concatenate(ents) if ents else np.zeros(0, np.int64)).astype(np.int32)[order],
        n_events=n,
        n_specs=len(config.specs),
        index=dict(zip(names, range(len(names)), strict=True)),
    )


#: items :class:`RequestSlots` keeps templates of before it starts again
MEMO_ITEMS = 200_000


def _shared_texts(f: str, user_id: str, ts: float, context: Any, user: Any) -> list[str] | None:
    """The texts of key field ``f`` shared by every event of a request (one user, one
    context, one time); ``None`` for a field that varies with the item."""
    if f == "user_id":
        return [user_id] if user_id else []
    if f in ("hour", "weekday"):
        v = (math.floor(ts / 3600.0) % 24) if f == "hour" else ((math.floor(ts / 86400.0) + 3) % 7)
        return [_HOURS[int(v)]]
    if _item_side(f):
        return None
    obj, name = f.split(".", 1)
    d = context if obj == "context" else user if obj == "user" else None
    t = canonical(d.get(name)) if d else ""
    return [t] if t else []


def _shared_runs(cols: Mapping[str, Any]) -> tuple[np.ndarray, list[tuple]]:
    """The events as runs sharing user, context and time (one scoring request's, or
    several requests' read together): ``(where each run starts, its (user_id, ts,
    context, user))``."""
    ts, users = cols["ts"], cols["user_id"]
    n = len(ts)
    if not n:
        return np.zeros(0, np.int64), []
    ctx, usr = cols.get("context"), cols.get("user")
    if n > 1:  # one event (a one-candidate request) is one run by definition
        new = (ts[1:] != ts[:-1]) | (users[1:] != users[:-1])
        for col in (ctx, usr):
            if col is None or col.count(col[0]) == n:  # each `is` or `==` the first: no end
                continue
            # each `is` the one before (one request's rows share the object), else `==`
            differ = ~np.fromiter(map(operator.is_, col[1:], col[:-1]), bool, n - 1)
            for k in np.flatnonzero(differ & ~new).tolist():
                new[k] = col[k + 1] != col[k]
        if new.any():  # several runs (requests read together)
            starts = np.concatenate([[0], np.flatnonzero(new) + 1])
            return starts, [(users[k], float(ts[k]), ctx[k] if ctx is not None else None,
                             usr[k] if usr is not None else None) for k in starts.tolist()]
    return np.zeros(1, np.int64), [(users[0], float(ts[0]), _first(ctx), _first(usr))]


def _first(col: Any) -> Any:
    return col[0] if col is not None else None


class RequestSlots:
    """:func:`resolve_refs` for the events of scoring requests (each one user, one
    context and one time, many items; one request, or several read together, each in a
    run of its own) with numbered entities (the slots of
    :class:`features.read_cache.ReadCache`): their references as ``Refs`` whose
    ``entity`` are the entities' slots (``entities`` is empty).

    Each item keeps a template: its references spec by spec, an item-only spec's
    entities (``item:9``, ``genre:Comedy``) as slots, and for the specs that need the
    user, the context or the time, a placeholder per combination of the item's own key
    texts (``user_genre`` and ``Comedy``). A request puts its candidates' templates side by
    side and turns each distinct placeholder of a run into a slot once
    (``user_genre:7|Comedy``). The references are those of :func:`resolve_refs` in the
    same order (each event's, spec by spec, each spec's in key order), so sums over them
    are the same.

    A template is kept while the item's attributes are the same object and the slots'
    ``generation`` has not changed.

    >>> cfg = CounterConfig(specs=(CounterSpec("user", key=("user_id",)),
    ...                            CounterSpec("genre", key=("genre",)),
    ...                            CounterSpec("user_genre", key=("user_id", "genre"))))
    >>> names = {}
    >>> slot = lambda e: names.setdefault(e, len(names))
    >>> cols = as_columns({"ts": [0.0, 0.0], "user_id": [7, 7], "item_id": [9, 8]})
    >>> r = RequestSlots(cfg).refs(cols, {"9": {"genres": ["Comedy", "Drama"]}}, slot, 0)
    >>> by_slot = list(names)
    >>> [(int(e), by_slot[k]) for e, k in zip(r.event, r.entity)]  # doctest: +NORMALIZE_WHITESPACE
    [(0, 'user:7'), (0, 'genre:Comedy'), (0, 'genre:Drama'), (0, 'user_genre:7|Comedy'),
     (0, 'user_genre:7|Drama'), (1, 'user:7')]

    Two requests read together (users 7 and 5, four candidates each):

    >>> cols = as_columns({"ts": [0.0] * 8, "user_id": [7] * 4 + [5] * 4,
    ...                    "item_id": [9, 8, 8, 8, 9, 8, 8, 8]})
    >>> r = RequestSlots(cfg).refs(cols, {"9": {"genres": ["Comedy"]}}, slot, 0)
    >>> by_slot = list(names)
    >>> [by_slot[k] for e, k in zip(r.event, r.entity) if e in (0, 4)]
    ['user:7', 'genre:Comedy', 'user_genre:7|Comedy', 'user:5', 'genre:Comedy', 'user_genre:5|Comedy']
    """

    def __init__(self, config: CounterConfig) -> None:
        self.config = config
        self._holders: dict[tuple[int, tuple[str, ...]], int] = {}  # placeholder -> number
        self._holder_keys: list[tuple[int, tuple[str, ...]]] = []
        self._reset(0)

    def _reset(self, generation: int) -> None:
        """Forget every template (slots numbered anew, or too many kept)."""
        self._generation = generation
        # item -> its template's number; forgotten only here, with the flat arrays
        self._items = ItemTable(objects=1, limit=None)
        self._start = np.zeros(self._items.capacity, np.int64)  # where it starts in the flat arrays
        self._len = np.zeros(self._items.capacity, np.int64)
        self._spec = np.zeros(16_384, np.int32)  # templates back to back
        self._code = np.zeros(16_384, np.int64)
        self._used = 0
        self._live = 0  # references of the templates in use (the rest was replaced)

    def refs(self, cols: Mapping[str, Any], item_attrs: Mapping[str, Mapping] | None,
             slot: Any, generation: int) -> Refs:
        """References of the events ``cols`` with entity slots ``slot(name)``."""
        starts, shared = _shared_runs(cols)
        items = cols["item_id"].tolist()
        n = len(items)
        if (generation != self._generation or len(self._items) + n > MEMO_ITEMS
                or self._used > 4 * self._live + 65_536):
            self._reset(generation)
        attrs_of = (item_attrs or {}).get
        table = self._items
        attrs = [*map(attrs_of, items)]
        ids, stale = table.rows(items, attrs)
        if len(stale):
            for r in {items[r]: r for r in stale.tolist()}.values():  # a row per item
                self._build(int(ids[r]), items[r], attrs[r], slot)
        lens = self._len[ids]
        total = int(lens.sum())
        at = np.repeat(self._start[ids] - (np.cumsum(lens) - lens), lens) + np.arange(total)
        spec, code = self._spec[at], self._code[at]
        event = np.repeat(np.arange(n, dtype=np.int64), lens)
        held = code < 0
        if held.any():  # placeholders: each distinct one of a run made an entity once
            key = -1 - code[held]
            h = len(self._holder_keys)
            if len(starts) > 1:  # (run, placeholder) pairs, as run * h + placeholder
                key += h * (np.searchsorted(starts, event[held], side="right") - 1)
            ids, inverse = np.unique(key, return_inverse=True)
            texts: list[dict[str, list[str] | None]] = [{} for _ in shared]
            lut = np.array([self._entity(p, shared[r], texts[r], slot)
                            for r, p in zip(*map(np.ndarray.tolist, np.divmod(ids, h)),
                                            strict=True)], np.int64)
            code[held] = lut[inverse]
            if (lut < 0).any():  # a shared key field is missing: no reference
                keep = code >= 0
                event, spec, code = event[keep], spec[keep], code[keep]
        return Refs(entities=[], event=event, spec=spec, entity=code, n_events=n,
                    n_specs=len(self.config.specs))

    def _build(self, k: int, item: str, attrs: Mapping[str, Any] | None, slot: Any) -> None:
        """Item ``item``'s template (number ``k``) from ``attrs``, appended to the flat
        arrays."""
        spec, code = self._template(item, attrs, slot)
        if k >= len(self._len):
            more = self._items.capacity - len(self._len)
            self._start = np.concatenate([self._start, np.zeros(more, np.int64)])
            self._len = np.concatenate([self._len, np.zeros(more, np.int64)])
        self._live -= int(self._len[k])  # 0 for a new item's
        end = self._used + len(code)
        while end > len(self._code):
            self._spec = np.concatenate([self._spec, np.zeros_like(self._spec)])
            self._code = np.concatenate([self._code, np.zeros_like(self._code)])
        self._spec[self._used:end], self._code[self._used:end] = spec, code
        self._items.keep(k, (attrs,))
        self._start[k], self._len[k] = self._used, len(code)
        self._used = end
        self._live += len(code)

    def _holder(self, s: int, combo: tuple[str, ...]) -> int:
        got = self._holders.get((s, combo))
        if got is None:
            got = self._holders[s, combo] = len(self._holder_keys)
            self._holder_keys.append((s, combo))
        return -1 - got

    def _template(self, item: str, attrs: Mapping[str, Any] | None,
                  slot: Any) -> tuple[np.ndarray, np.ndarray]:
        """One item's references spec by spec: ``(spec int32, code int64)``, a code a slot
        (>= 0) or a placeholder (< 0)."""
        texts: dict[str, list[str]] = {}
        specs, codes = [], []
        for s, spec in enumerate(self.config.specs):
            side = [f for f in spec.key if _item_side(f)]
            for f in side:
                if f not in texts:
                    texts[f] = (([item] if item else []) if f == "item_id"
                                else _item_field_texts(_item_attr(f), attrs))
            combos = list(itertools.product(*(texts[f] for f in side)))
            if side and len(side) == len(spec.key):  # item-only: the entities themselves
                got = [slot(f"{spec.name}:" + "|".join(c)) for c in combos]
            else:
                got = [self._holder(s, c) for c in combos]
            specs += [s] * len(got)
            codes += got
        return np.array(specs, np.int32), np.array(codes, np.int64)

    def _entity(self, p: int, shared: tuple[str, float, Any, Any],
                texts: dict[str, list[str] | None], slot: Any) -> int:
        """Placeholder ``p``'s slot for this request's user, context and time (-1: a
        shared key field is missing)."""
        s, combo = self._holder_keys[p]
        spec = self.config.specs[s]
        parts, side = [], iter(combo)
        for f in spec.key:
            if _item_side(f):
                parts.append(next(side))
                continue
            if f not in texts:
                texts[f] = _shared_texts(f, *shared)
            got = texts[f]
            if not got:
                return -1
            parts.append(got[0])
        return slot(f"{spec.name}:" + "|".join(parts) if spec.key else spec.name)


_LONGEST = float(np.finfo(np.float64).max)


def decay_state(config: CounterConfig, state: np.ndarray, at: np.ndarray | float) -> np.ndarray:
    """Decay stored states ``[K, width + 1]`` (last column ``t``) to times ``at``.

    Never decays backwards: a state newer than ``at`` is returned as stored. ``t`` NaN
    (an entity never written, whose fields read as 0) is not decayed.
    """
    t = state[:, config.width]
    dt = np.asarray(at, dtype=np.float64) - t
    # never backwards; NaN (never written): not decayed; an infinite gap decays to 0 as
    # any huge one does (and keeps the totals' factor 1: inf / inf would be NaN)
    dt = np.where(dt > 0.0, np.minimum(dt, _LONGEST), 0.0)
    # every column's factor at once: exp2(-dt / h) for the decayed (n, c) pairs, and the
    # totals' half-life inf gives exp2(-0.0) == 1.0, so they are multiplied by exactly 1
    return state[:, : config.width] * np.exp2(-dt[:, None] / config.column_half_lives)


def decay_shards(config: CounterConfig, shards: Sequence[np.ndarray], at: float) -> np.ndarray:
    """Per-shard states (each ``[K, width + 1]``) decayed to ``at`` and summed over shards,
    shard by shard in order (the sum of :func:`decay_state` per shard), decayed in one call.

    >>> cfg = CounterConfig(specs=(CounterSpec("x"),), half_lives=(10.0,))
    >>> s = [np.array([[2.0, 1.0, 2.0, 1.0, 0.0]]), np.array([[1.0, 0.0, 1.0, 0.0, 10.0]])]
    >>> decay_shards(cfg, s, 10.0).tolist()
    [[3.0, 1.0, 2.0, 0.5]]
    """
    total = np.zeros((len(shards[0]) if len(shards) else 0, config.width))
    if not len(shards) or not total.size:
        return total
    decayed = decay_state(config, np.concatenate(shards), at).reshape(len(shards), -1, config.width)
    for part in decayed:
        total += part
    return total


def aggregate(refs: Refs, per_ref: np.ndarray) -> np.ndarray:
    """Sum per-reference states into ``[n_events, n_specs, width]`` (pools multi-valued keys)."""
    width = per_ref.shape[1]
    key = refs.event * refs.n_specs + refs.spec
    size = refs.n_events * refs.n_specs
    # a column at a time: bincount adds the references in order, as ``np.add.at`` would
    # (the same sums to the bit), and costs less than half of it
    cols = [np.bincount(key, weights=col, minlength=size) for col in per_ref.T]
    out = np.stack(cols, axis=1) if cols else np.zeros((size, 0))
    return out.reshape(refs.n_events, refs.n_specs, width)


def smoothed_ctr(config: CounterConfig, clicks, impressions):
    """The CTR every feature and every reader uses: ``(c + alpha * prior) / (n + alpha)``.

    >>> smoothed_ctr(CounterConfig(alpha=5.0, prior=0.5), 5.0, 10.0)
    0.5
    """
    return (clicks + config.alpha * config.prior) / (impressions + config.alpha)


class DerivedFeatures(dict):
    """:func:`derive_features`'s answer: a dict of named feature columns, each a row of
    :attr:`block` (``[features, n]``, rows in :attr:`names` order), so a reader that wants
    many of them takes them in one indexing (:meth:`features.rows.RowBuilder.score_matrices`)."""

    block: np.ndarray
    names: tuple[str, ...]


def derive_features(config: CounterConfig, agg: np.ndarray) -> DerivedFeatures:
    """Named features from aggregated states ``[n, n_specs, width]``.

    >>> cfg = CounterConfig(specs=(CounterSpec("item", key=("item_id",)),), half_lives=(3600,))
    >>> f = derive_features(cfg, np.array([[[10.0, 5.0, 2.0, 1.0]]]))
    >>> float(f["item_ctr_total"][0]), float(f["item_impressions_1h"][0])
    (0.5, 2.0)
    >>> f.block.shape, f.names[:3]
    ((6, 1), ('item_impressions_total', 'item_clicks_total', 'item_ctr_total'))
    """
    # impressions (total, then per half-life) are the even state columns, clicks the odd
    # ones: every CTR in one call; [part, n, spec, column] -> rows (spec, column, part)
    imps, clicks = agg[:, :, 0::2], agg[:, :, 1::2]
    ctrs = smoothed_ctr(config, clicks, imps)
    names = config.feature_names_in_layout
    block = np.stack((imps, clicks, ctrs)).transpose(2, 3, 0, 1).reshape(len(names), len(agg))
    out = DerivedFeatures(zip(names, block, strict=True))
    out.block, out.names = block, names
    return out
