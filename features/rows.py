"""Training and scoring rows: one code path from events and features to model columns.

:meth:`RowBuilder.build` turns a batch of click events plus their *pre-event* counter
features (from :meth:`features.store.OnlineStore.apply_batch`) into exactly the
``columns`` of the train-batch contract (docs/contracts.md): ``event_id, ts, label,
offset, sub``, one int64 ``c:<field>`` per categorical field and one float32
``d:<name>`` per dense feature. :meth:`RowBuilder.build_for_scoring` builds the same
columns, minus the fixed ones, for one user and many candidate items from
:meth:`~features.store.OnlineStore.get_online_features`. Both go through
``_feature_columns``, so training and serving cannot drift apart.

Categorical fields (all hashed with :func:`features.hashing.hash_tokens`, 0 = missing):

- ``user_id``, ``item_id``;
- user attributes from the click's ``user`` object: ``age`` (bucketed as in
  MovieLens-1M: <18, 18, 25, 35, 45, 50, 56+), ``zip3`` (first 3 chars of ``zip_code``),
  any other name verbatim (``gender``, ``occupation``);
- item attributes: ``genre`` (the first of ``genres``/``tags``), ``year``, any other name
  (first element if a list);
- context: ``hour`` and ``weekday`` derived from the event time (UTC), any other name
  from the click's ``context``;
- bucketized counters: ``<counter>_imp_bucket`` (log2 of all-time impressions) and
  ``<counter>_ctr_bucket`` (smoothed all-time CTR in fixed edges; cold entities get a
  bucket of their own rather than the prior's);
- item quantized codes: ``rq0``…``rq5``, ``vq`` or ``vq3`` = element 3 of code ``vq``.

Dense features: ``log1p`` of impressions (all-time and per half-life) and smoothed CTRs.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from features.counters import CounterConfig, as_columns, half_life_label
from features.hashing import canonical, digests, factorize, hash_tokens
from features.item_table import ItemTable
from features.schema import FeatureSchema

__all__ = ["RowBuilder", "RowConfig"]

_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
_AGE_LABELS = np.array(["1", "18", "25", "35", "45", "50", "56"], dtype=object)
_CODE = re.compile(r"^([A-Za-z_]+?)(\d*)$")


@dataclass(frozen=True)
class RowConfig:
    """Which fields a row carries; the :class:`FeatureSchema` follows from it."""

    counters: CounterConfig = field(default_factory=CounterConfig)
    user_fields: tuple[str, ...] = ("age", "gender", "occupation", "zip3")
    item_fields: tuple[str, ...] = ("year", "genre")
    context_fields: tuple[str, ...] = ("hour", "weekday")
    code_fields: tuple[str, ...] = ()
    bucket_counters: tuple[str, ...] | None = None
    ctr_edges: tuple[float, ...] = tuple(round(x, 2) for x in np.arange(0.1, 1.0, 0.1))
    max_imp_bucket: int = 20
    version: int = 1
    #: ``name:digest`` of the feature definition (features/definition.py), into the schema
    definition: str | None = None
    #: the user's recent clicks before the event (features/sequence.py): fields ``seq0``
    #: (newest) … ``seq<L-1>``, each the clicked item's ``item_id`` token (0: none)
    seq_len: int = 0


class RowBuilder:
    """Build train-batch columns (and scoring columns) for a :class:`RowConfig`.

    Examples
    --------
    >>> from features.counters import CounterConfig, CounterSpec
    >>> cfg = RowConfig(counters=CounterConfig(specs=(CounterSpec("item", key=("item_id",)),),
    ...                                        half_lives=(3600,)))
    >>> rb = RowBuilder(cfg)
    >>> rb.schema.categorical
    ['user_id', 'item_id', 'age', 'gender', 'occupation', 'zip3', 'year', 'genre', 'hour', 'weekday', 'item_imp_bucket', 'item_ctr_bucket']
    >>> rb.schema.dense
    ['log1p_item_impressions_total', 'item_ctr_total', 'log1p_item_impressions_1h', 'item_ctr_1h']
    """

    def __init__(self, config: RowConfig | None = None) -> None:
        self.config = config or RowConfig()
        c = self.config
        names = [s.name for s in c.counters.specs]
        self._buckets = names if c.bucket_counters is None else list(c.bucket_counters)
        unknown = set(self._buckets) - set(names)
        if unknown:
            raise ValueError(f"RowConfig.bucket_counters: unknown counters {sorted(unknown)}")
        self._codes = []
        for f in c.code_fields:
            m = _CODE.match(f)
            if not m:
                raise ValueError(f"RowConfig.code_fields: {f!r} is not like 'rq0' or 'vq'")
            self._codes.append((f, m.group(1), int(m.group(2) or 0)))
        categorical = ["user_id", "item_id", *c.user_fields, *c.item_fields, *c.context_fields]
        for b in self._buckets:
            categorical += [f"{b}_imp_bucket", f"{b}_ctr_bucket"]
        categorical += list(c.code_fields)
        categorical += [f"seq{k}" for k in range(c.seq_len)]
        self._dense: list[tuple[str, str, bool]] = []  # (dense name, source feature, log1p?)
        for s in names:
            for lab in ["total", *(half_life_label(h) for h in c.counters.half_lives)]:
                self._dense.append((f"log1p_{s}_impressions_{lab}", f"{s}_impressions_{lab}", True))
                self._dense.append((f"{s}_ctr_{lab}", f"{s}_ctr_{lab}", False))
        self.schema = FeatureSchema(categorical, [d for d, _, _ in self._dense], c.version,
                                    c.definition)
        self._tables: dict[str, np.ndarray] = {}  # token per small int, per bucket field
        # scoring: per canonical item id, its tokens [item_id, item fields..., code
        # fields...] and the (attributes, codes) objects they were computed from
        self._item_fields = [(f, None) for f in c.item_fields]
        self._item_fields += [(name, (kind, idx)) for name, kind, idx in self._codes]
        #: each item's tokens, by its number in ``_items`` (see :meth:`item_blocks`)
        self._items = ItemTable(objects=2, limit=200_000)
        self._item_tok = np.zeros((self._items.capacity, 1 + len(self._item_fields)), np.int64)
        # scoring matrices: each categorical column's position; where item blocks go
        self._positions = {f"c:{f}": j for j, f in enumerate(categorical)}
        self._block_positions = [self._positions[f"c:{f}"]
                                 for f in ["item_id", *(name for name, _ in self._item_fields)]]
        # scoring matrices: the dense sources in one array, the bucket counters' rows in it
        src_row = {src: k for k, (_, src, _) in enumerate(self._dense)}
        self._dense_log_rows = [k for k, (_, _, log) in enumerate(self._dense) if log]
        self._bucket_imp_rows = [src_row[f"{b}_impressions_total"] for b in self._buckets]
        self._bucket_ctr_rows = [src_row[f"{b}_ctr_total"] for b in self._buckets]
        self._bucket_imp_pos = [self._positions[f"c:{b}_imp_bucket"] for b in self._buckets]
        self._bucket_ctr_pos = [self._positions[f"c:{b}_ctr_bucket"] for b in self._buckets]
        self._bucket_rows = np.arange(len(self._buckets))[:, None]
        self._shared_rows: dict[tuple, tuple[list[int], np.ndarray]] = {}
        # scoring matrices: the dense sources' rows in the derived features' block, for
        # the block names last seen (None: a source is missing there, read by name)
        self._block_names: tuple[str, ...] | None = None
        self._block_rows: np.ndarray | None = None
        self._bucket_table: dict[str, np.ndarray] = {}  # "imp"/"ctr" -> [buckets, values]

    # -- public -----------------------------------------------------------------------
    def build(
        self,
        events: Any,
        pre_features: Mapping[str, np.ndarray],
        item_attrs: Mapping[Any, Mapping[str, Any]] | None = None,
        codes: Mapping[Any, Mapping[str, Sequence[int]]] | None = None,
        sequences: Sequence[Sequence[str]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Train-batch ``columns`` for click events and their pre-event features.

        ``item_attrs`` and ``codes`` map item id → attributes / codes (as in
        ``BatchResult.item_attrs`` / ``.codes``); missing items give token 0.
        ``sequences``: per event its pre-event recent clicks (``BatchResult.sequences``).
        """
        cols = as_columns(events)
        for need in ("event_id", "label", "offset"):
            if need not in cols:
                raise ValueError(f"RowBuilder.build: events need an {need!r} column")
        items = cols["item_id"]
        inverse, uniq = factorize(items)
        row_attrs = list(map(_by_text(item_attrs).get, uniq))
        row_codes = list(map(_by_text(codes).get, uniq))
        out: dict[str, np.ndarray] = {
            "event_id": cols["event_id"],  # canonical str objects: Arrow takes them as they are
            "ts": cols["ts"],
            "label": cols["label"].astype(np.int8),
            "offset": cols["offset"],
            "sub": cols["sub"].astype(np.int32),
        }
        out.update(
            self._feature_columns(cols, pre_features, row_attrs, row_codes, inverse, uniq)
        )
        out.update(self._sequence_columns(sequences, len(out["ts"])))
        return out

    def build_for_scoring(
        self,
        user_id: Any,
        user_attrs: Mapping[str, Any] | None,
        context: Mapping[str, Any] | None,
        candidate_item_ids: Sequence[Any],
        features: Mapping[str, Any],
        now: float | None = None,
    ) -> dict[str, np.ndarray]:
        """The same ``c:``/``d:`` columns for one user and many candidates.

        ``features`` is what ``get_online_features`` returned for rows
        ``{"user_id": user_id, "item_id": c}`` in candidate order; ``user_attrs`` None
        falls back to the stored ones in ``features["user_attrs"]``.
        """
        n = len(candidate_item_ids)
        ts = time.time() if now is None else float(now)
        if user_attrs is None and features.get("user_attrs"):
            user_attrs = features["user_attrs"][0]
        cols = as_columns(
            {
                "ts": np.full(n, ts),
                "user_id": [user_id] * n,
                "item_id": list(candidate_item_ids),
                "user": [user_attrs] * n,
                "context": [context] * n,
            }
        )
        row_attrs = list(features.get("item_attrs") or [None] * n)
        row_codes = list(features.get("codes") or [None] * n)
        blocks = self.item_blocks(cols["item_id"], row_attrs, row_codes)
        out = self._feature_columns(cols, features, row_attrs, row_codes, np.arange(n),
                                    item_blocks=blocks, shared=n > 0)
        out.update(self._sequence_columns(features.get("user_seq"), n))
        return out

    def score_matrices(
        self,
        user_id: Any,
        user_attrs: Mapping[str, Any] | None,
        context: Mapping[str, Any] | None,
        candidate_item_ids: Sequence[Any],
        features: Mapping[str, Any],
        now: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[n, F]`` int64 and dense ``[n, D]`` float32 in schema order: the
        columns of :meth:`build_for_scoring` stacked, written straight into two arrays.

        The user's, context and time tokens are computed once and broadcast, the item
        tokens come from :meth:`item_blocks` in one assignment, the bucket and dense
        columns are computed per column as the shared path computes them (same values).
        """
        n = len(candidate_item_ids)
        if not n or self.config.seq_len:
            cols = self.build_for_scoring(user_id, user_attrs, context, candidate_item_ids,
                                          features, now=now)
            return self._stack(cols, n)
        ts = time.time() if now is None else float(now)
        if user_attrs is None and features.get("user_attrs"):
            user_attrs = features["user_attrs"][0]
        cat = np.empty((n, len(self._positions)), np.int64)
        shared_pos, shared_row = self._shared_row(user_id, user_attrs, context, ts)
        cat[:, shared_pos] = shared_row
        items = [i if type(i) is str else canonical(i) for i in candidate_item_ids]
        row_attrs = list(features.get("item_attrs") or [None] * n)
        row_codes = list(features.get("codes") or [None] * n)
        cat[:, self._block_positions] = self.item_blocks(items, row_attrs, row_codes)
        # every dense source in one array [D, n] (the bucket counters' totals are among them)
        raw = self._dense_sources(features, n)
        if self._buckets:
            imp_b, ctr_b = self._bucket_matrix(raw[self._bucket_imp_rows], raw[self._bucket_ctr_rows])
            cat[:, self._bucket_imp_pos] = imp_b.T
            cat[:, self._bucket_ctr_pos] = ctr_b.T
        logs = self._dense_log_rows
        raw[logs] = np.log1p(raw[logs])
        return cat, raw.T.astype(np.float32, order="C")  # float64 -> float32 as astype casts

    def _dense_sources(self, features: Mapping[str, Any], n: int) -> np.ndarray:
        """The dense sources ``[D, n]`` float64: one indexing of the derived features' block
        (:class:`features.counters.DerivedFeatures`), else column by column."""
        block, names = getattr(features, "block", None), getattr(features, "names", None)
        if block is not None and block.shape[1:] == (n,) and block.dtype == np.float64:
            if names is not self._block_names:  # once per store config, not per request
                at = {name: k for k, name in enumerate(names)}
                rows = [at.get(src) for _, src, _ in self._dense]
                self._block_rows = None if None in rows else np.array(rows, np.int64)
                self._block_names = names
            if self._block_rows is not None:
                return block[self._block_rows]
        return np.array([_feature(features, src, n) for _, src, _ in self._dense], np.float64)

    def _shared_row(self, user_id: Any, user_attrs: Mapping[str, Any] | None,
                    context: Mapping[str, Any] | None, ts: float) -> tuple[list[int], np.ndarray]:
        """Positions and tokens of the user's, user attributes', context and time columns
        of one scoring request, kept per (user, attributes, context, hour): a user scored
        again within the hour with the same attributes and context reuses them."""
        uid = canonical(user_id)
        try:
            key = (uid, _frozen(user_attrs), _frozen(context), math.floor(ts / 3600.0))
            got = self._shared_rows.get(key)
        except TypeError:  # an unhashable attribute value: computed, not kept
            key, got = None, None
        if got is None:
            one = {"ts": np.full(1, ts), "user_id": np.asarray([uid], dtype=object),
                   "user": [user_attrs or None], "context": [context or None]}  # as as_columns
            cols = self._shared_columns(one)
            pos = self._positions
            got = ([pos[name] for name in cols], np.array([col[0] for col in cols.values()], np.int64))
            if key is not None:
                if len(self._shared_rows) >= 100_000:
                    self._shared_rows.clear()
                self._shared_rows[key] = got
        return got

    def _bucket_matrix(self, n_tot: np.ndarray, ctr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_bucket_tokens` of every bucket counter at once: ``n_tot`` and ``ctr`` are
        ``[buckets, n]``; returns the impression and CTR bucket tokens, each ``[buckets, n]``."""
        c = self.config
        imp_b, ctr_b = self._bucket_indices(n_tot, ctr)
        if imp_b.size and (imp_b.min() < 0 or imp_b.max() > c.max_imp_bucket):
            # outside the tables (e.g. NaN counts): the general path, field by field
            imp = np.stack([self._small_ints(f"{b}_imp_bucket", imp_b[k], 0, c.max_imp_bucket)
                            for k, b in enumerate(self._buckets)])
        else:
            imp = self._bucket_tables("imp")[self._bucket_rows, imp_b]
        return imp, self._bucket_tables("ctr")[self._bucket_rows, ctr_b + 1]

    def _bucket_tables(self, kind: str) -> np.ndarray:
        """``[buckets, values]``: row k is :meth:`_small_ints`'s table of bucket counter k's
        ``imp`` (0 .. max_imp_bucket) or ``ctr`` (-1 .. len(ctr_edges)) field."""
        got = self._bucket_table.get(kind)
        if got is None:
            c = self.config
            lo, hi = (0, c.max_imp_bucket) if kind == "imp" else (-1, len(c.ctr_edges))
            rows = []
            for b in self._buckets:
                f = f"{b}_{kind}_bucket"
                self._small_ints(f, np.array([lo]), lo, hi)  # builds the field's table
                rows.append(self._tables[f])
            got = self._bucket_table[kind] = np.stack(rows)
        return got

    def _stack(self, cols: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Columns as tokens ``[n, F]`` and dense ``[n, D]`` in schema order."""
        cat = np.zeros((n, len(self.schema.categorical)), np.int64)
        dense = np.zeros((n, len(self.schema.dense)), np.float32)
        for j, f in enumerate(self.schema.categorical):
            cat[:, j] = cols[f"c:{f}"]
        for j, d in enumerate(self.schema.dense):
            dense[:, j] = cols[f"d:{d}"]
        return cat, dense

    def item_blocks(self, item_ids: Sequence[str], attrs: Sequence[Mapping[str, Any] | None],
                    codes: Sequence[Mapping[str, Sequence[int]] | None]) -> np.ndarray:
        """Per row, the item's tokens ``[n, 1 + item fields + code fields]`` (``item_id``
        first), each computed once per item and kept while the item's attributes and
        codes are the same objects (the online store's cache hands out the objects it
        read; a re-read makes new ones, and the tokens are recomputed).

        ``item_ids`` are canonical. The tokens are those of the shared path (a function
        of one field and one value each), so cached and fresh blocks are equal.
        """
        table = self._items
        ks, stale = table.rows(item_ids, attrs, codes)
        if len(self._item_tok) < table.capacity:
            more = table.capacity - len(self._item_tok)
            self._item_tok = np.vstack([self._item_tok, np.zeros((more, self._item_tok.shape[1]), np.int64)])
        if len(stale):
            todo = {item_ids[r]: r for r in stale.tolist()}  # a row per item
            rows = list(todo.values())
            fresh = np.empty((len(rows), self._item_tok.shape[1]), np.int64)
            fresh[:, 0] = digests("item_id", list(todo))
            if self._item_fields:
                tokens = _item_columns(self._item_fields, [attrs[r] for r in rows],
                                       [codes[r] for r in rows])
                fresh[:, 1:] = np.stack(tokens, axis=1)
            at = ks[rows]
            self._item_tok[at] = fresh
            for k, r in zip(at.tolist(), rows, strict=True):
                table.keep(k, (attrs[r], codes[r]))
        return self._item_tok[ks]

    def _sequence_columns(self, sequences: Sequence[Sequence[str]] | None,
                          n: int) -> dict[str, np.ndarray]:
        """``c:seq0`` (newest click) … as ``item_id`` tokens; a row without one: 0."""
        L = self.config.seq_len
        if not L:
            return {}
        if sequences is None:
            raise ValueError(f"rows with seq_len={L} need the users' recent clicks: the "
                             "online store must keep them (the same seq_len)")
        grid = [[None] * L for _ in range(n)]
        for r, seq in enumerate(sequences):
            for k, item in enumerate(reversed(seq[-L:])):
                grid[r][k] = item
        return {f"c:seq{k}": hash_tokens("item_id", [row[k] for row in grid]) for k in range(L)}

    # -- shared path ------------------------------------------------------------------
    def _feature_columns(
        self,
        cols: Mapping[str, Any],
        feats: Mapping[str, Any],
        item_attrs: list[Mapping[str, Any] | None],
        item_codes: list[Mapping[str, Sequence[int]] | None],
        item_index: np.ndarray,
        item_texts: list[str] | None = None,
        item_blocks: np.ndarray | None = None,
        shared: bool = False,
    ) -> dict[str, np.ndarray]:
        """``item_attrs``/``item_codes`` are per distinct item; ``item_index`` maps rows to them.

        ``item_texts`` (the canonical item ids in ``item_attrs`` order, when rows were
        factorised by item) saves hashing ``item_id`` per row. Every token is a function
        of one (field, canonical text), so columns are computed per distinct value (per
        distinct item for item attributes and codes) and indexed back to rows.
        ``item_blocks`` (:meth:`item_blocks`, per row) replaces computing the item's tokens.
        ``shared``: every row has the same user, user attributes, context and time (one
        scoring request), so their tokens are computed on the first row and repeated.
        """
        c = self.config
        n = len(cols["ts"])
        if shared:  # one row's user, context and time columns, repeated for every row
            one = {k: cols[k][:1] for k in ("ts", "user_id", "user", "context")}
            same = {name: np.repeat(col, n) for name, col in self._shared_columns(one).items()}
        else:
            same = self._shared_columns(cols)
        out: dict[str, np.ndarray] = {}
        out["c:user_id"] = same["c:user_id"]
        if item_blocks is not None:
            out["c:item_id"] = item_blocks[:, 0]
        elif item_texts is not None:
            out["c:item_id"] = digests("item_id", item_texts)[item_index]
        else:
            out["c:item_id"] = hash_tokens("item_id", cols["item_id"])
        for f in c.user_fields:
            out[f"c:{f}"] = same[f"c:{f}"]
        item_fields = self._item_fields
        if item_blocks is not None:
            per_item = {key: item_blocks[:, 1 + k] for k, key in enumerate(item_fields)}
            item_index = np.arange(n)
        else:
            tokens = _item_columns(item_fields, item_attrs, item_codes)
            per_item = dict(zip(item_fields, tokens, strict=True))
        for f in c.item_fields:
            out[f"c:{f}"] = per_item[f, None][item_index]
        for f in c.context_fields:
            out[f"c:{f}"] = same[f"c:{f}"]
        for b in self._buckets:
            out[f"c:{b}_imp_bucket"], out[f"c:{b}_ctr_bucket"] = self._bucket_tokens(feats, b, n)
        for name, kind, idx in self._codes:
            out[f"c:{name}"] = per_item[name, (kind, idx)][item_index]
        for dname, src, log in self._dense:
            v = _feature(feats, src, n)
            out[f"d:{dname}"] = (np.log1p(v) if log else v).astype(np.float32)
        return out

    def _bucket_tokens(self, feats: Mapping[str, Any], b: str,
                       n: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of counter ``b``'s impression bucket (log2 of all-time impressions) and
        CTR bucket (all-time CTR in the fixed edges; -1 before any impression)."""
        c = self.config
        imp_b, ctr_b = self._bucket_indices(_feature(feats, f"{b}_impressions_total", n),
                                            _feature(feats, f"{b}_ctr_total", n))
        return (self._small_ints(f"{b}_imp_bucket", imp_b, 0, c.max_imp_bucket),
                self._small_ints(f"{b}_ctr_bucket", ctr_b, -1, len(c.ctr_edges)))

    def _bucket_indices(self, n_tot: np.ndarray, ctr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Impression bucket (log2 of all-time impressions, capped) and CTR bucket (index in
        the fixed edges; -1 before any impression) as int64, elementwise."""
        c = self.config
        imp_b = np.minimum(np.floor(np.log2(1.0 + n_tot)), c.max_imp_bucket).astype(np.int64)
        ctr_b = np.where(n_tot > 0, np.searchsorted(np.asarray(c.ctr_edges), ctr), -1)
        return imp_b, ctr_b.astype(np.int64)

    def _shared_columns(self, cols: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The user's, user attributes', context and time columns (``c:user_id`` and the
        user and context fields) of rows ``cols``."""
        out = {"c:user_id": hash_tokens("user_id", cols["user_id"])}
        out.update(_users_tokens(self.config.user_fields, cols["user"], cols["user_id"]))
        for f in self.config.context_fields:
            if f == "hour":
                hours = (np.floor(cols["ts"] / 3600) % 24).astype(np.int64)
                out[f"c:{f}"] = self._small_ints(f, hours, 0, 23)
            elif f == "weekday":
                days = ((np.floor(cols["ts"] / 86400) + 3) % 7).astype(np.int64)
                out[f"c:{f}"] = self._small_ints(f, days, 0, 6)
            else:
                ctx = cols["context"]
                out[f"c:{f}"] = hash_tokens(f, [d.get(f) if d else None for d in ctx])
        return out

    def _small_ints(self, field: str, values: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """``hash_tokens(field, values)`` for ints expected in ``[lo, hi]``: a table lookup.

        The table holds ``digests(field, str(v))`` for every v in range, built once per
        builder; a value outside the range takes the general path.
        """
        if not len(values):
            return np.zeros(0, np.int64)
        table = self._tables.get(field)
        if table is None:
            table = self._tables[field] = digests(field, [str(v) for v in range(lo, hi + 1)])
        if values.min() < lo or values.max() > hi:
            return hash_tokens(field, values)
        return table[values - lo]


def _frozen(d: Mapping[str, Any] | None) -> tuple | None:
    """A mapping as a key that tells ``1``, ``1.0`` and ``True`` apart (their tokens differ)."""
    return tuple((k, v.__class__, v) for k, v in d.items()) if d else None


def _feature(feats: Mapping[str, Any], name: str, n: int) -> np.ndarray:
    if name not in feats:
        raise KeyError(
            f"pre-event features lack {name!r}: build the store and rows from one CounterConfig"
        )
    v = np.asarray(feats[name], dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"feature {name!r} has shape {v.shape}, expected ({n},)")
    return v


def _ambiguous(v: Any) -> bool:
    """Whether ``==`` may call ``v`` equal to a value with another canonical text: ``True``
    and ``1`` (``"true"``, ``"1"``) are equal, as are ``False`` and ``0``."""
    if v is None or isinstance(v, str):
        return False
    try:
        return bool(v == 0 or v == 1)
    except Exception:  # noqa: BLE001 - no plain answer: treat it as ambiguous
        return True


def _users_tokens(fields: Sequence[str], users: list[Mapping[str, Any] | None],
                  user_ids: Any) -> dict[str, np.ndarray]:
    """``c:<field>`` tokens of the user fields, as :func:`_user_tokens` gives them.

    A user's events usually carry the same attributes, so the tokens are computed once per
    distinct user id, on the user's first event, and given to every event whose ``user``
    equals that one (``==``, checked in one C-level pass); an event whose ``user`` differs,
    or a user whose first values include one ``==`` cannot tell apart from another text
    (:func:`_ambiguous`), gets its own as before.
    """
    n = len(users)
    if not fields:
        return {}
    if n < 2 or not set(map(type, users)) <= {dict, type(None)}:
        return {f"c:{f}": _user_tokens(f, users) for f in fields}
    codes, _ = factorize(user_ids)
    _, first = np.unique(codes, return_index=True)
    reps = [users[i] for i in first.tolist()]
    bad_rep = np.fromiter((d is not None and any(_ambiguous(_user_value(f, d)) for f in fields)
                           for d in reps), bool, len(reps))
    same = np.fromiter(map(operator.eq, users, map(reps.__getitem__, codes.tolist())), bool, n)
    same &= ~bad_rep[codes]
    other = np.flatnonzero(~same)
    rest = [users[i] for i in other.tolist()]
    out = {}
    for f in fields:
        tokens = _user_tokens(f, reps)[codes]
        if len(other):
            tokens[other] = _user_tokens(f, rest)
        out[f"c:{f}"] = tokens
    return out


def _user_value(f: str, u: Mapping[str, Any]) -> Any:
    """The raw value user field ``f`` reads from a user's attributes."""
    return u.get("zip_code", u.get("zip")) if f == "zip3" else u.get(f)


def _user_tokens(f: str, users: list[Mapping[str, Any] | None]) -> np.ndarray:
    """Tokens of one user field; the mapping runs once per distinct raw value."""
    if f == "zip3":
        raw = [u.get("zip_code", u.get("zip")) if u else None for u in users]
    else:
        raw = [u.get(f) if u else None for u in users]
    codes, texts = factorize(raw)
    if f == "age":
        age = np.asarray([_num(t) if t else np.nan for t in texts], dtype=np.float64)
        labels = _AGE_LABELS[np.searchsorted(_AGE_EDGES, np.nan_to_num(age), side="right")]
        texts = [lab if not np.isnan(a) else "" for a, lab in zip(age, labels, strict=True)]
    elif f == "zip3":
        texts = [t[:3] for t in texts]
    return digests(f, texts)[codes] if texts else np.zeros(0, np.int64)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return np.nan


def _item_value(f: str, attrs: Mapping[str, Any] | None) -> Any:
    if not attrs:
        return None
    if f == "genre":
        v = attrs.get("genres") or attrs.get("tags")
    elif f == "year":
        v = attrs.get("year", attrs.get("release_year"))
    else:
        v = attrs.get(f)
    if isinstance(v, (list, tuple)):
        return v[0] if v else None
    return v


def _code(codes: Mapping[str, Sequence[int]] | None, kind: str, idx: int) -> Any:
    if not codes:
        return None
    seq = codes.get(kind)
    return seq[idx] if seq is not None and idx < len(seq) else None


def _by_text(mapping: Mapping[Any, Any] | None) -> Mapping[str, Any]:
    """``mapping`` keyed by canonical text (as it is already when keys are all ``str``)."""
    if not mapping:
        return {}
    if set(map(type, mapping)) == {str}:
        return mapping
    return {canonical(k): v for k, v in mapping.items()}


def _item_columns(
    fields: list[tuple[str, tuple[str, int] | None]],
    attrs: list[Mapping[str, Any] | None],
    codes: list[Mapping[str, Sequence[int]] | None],
) -> list[np.ndarray]:
    """Per field, the token of every distinct item (attributes, then code elements).

    Code elements come from an int matrix per code kind when every item's code is a list
    of ints long enough (the store's form); anything else takes the general path: one
    pass over the distinct items extracting every remaining field's raw value, then each
    field factorised and hashed once per distinct value.
    """
    m = len(attrs)
    if not m:
        return [np.zeros(1, np.int64) for _ in fields]  # indexable by an empty item_index
    done: dict[int, np.ndarray] = {}
    kinds: dict[str, list[int]] = {}
    for k, (_, code) in enumerate(fields):
        if code is not None:
            kinds.setdefault(code[0], []).append(k)
    for kind, ks in kinds.items():
        done.update(_code_matrix_tokens(kind, [fields[k] for k in ks], ks, codes))
    rest = [k for k in range(len(fields)) if k not in done]
    if rest:
        sub = [fields[k] for k in rest]
        width = len(sub)
        empty = (None,) * width

        def row(a: Mapping[str, Any] | None, cd: Mapping[str, Sequence[int]] | None) -> tuple:
            if not a and not cd:
                return empty
            out = []
            for f, code in sub:
                out.append(_item_value(f, a) if code is None else _code(cd, code[0], code[1]))
            return tuple(out)

        columns = list(zip(*map(row, attrs, codes), strict=True))
        for k, (f, _), col in zip(rest, sub, columns, strict=True):
            if col.count(None) == m:
                done[k] = np.zeros(m, np.int64)
                continue
            inv, texts = factorize(np.asarray(col, dtype=object))
            done[k] = digests(f, texts)[inv]
    return [done[k] for k in range(len(fields))]


def _code_matrix_tokens(
    kind: str,
    fields: list[tuple[str, tuple[str, int] | None]],
    positions: list[int],
    codes: list[Mapping[str, Sequence[int]] | None],
) -> dict[int, np.ndarray]:
    """Tokens of code elements ``kind[idx]`` per distinct item, or {} (general path).

    Applies when every present code of ``kind`` is a list/tuple of plain ints, all of
    one length covering every wanted element: then ``_code`` would return exactly
    ``matrix[item, idx]`` (or None where the item has no such code), and the canonical
    text of an int is ``str(int)``.
    """
    seqs = [cd.get(kind) if cd else None for cd in codes]
    have = [k for k, v in enumerate(seqs) if v is not None]
    vals = [seqs[k] for k in have]
    m = len(codes)
    if not vals:
        return {pos: np.zeros(m, np.int64) for pos in positions}
    need = max(code[1] for _, code in fields) + 1  # type: ignore[index]
    if not set(map(type, vals)) <= {list, tuple} or len(set(map(len, vals))) != 1:
        return {}
    if len(vals[0]) < need or set(map(type, itertools.chain.from_iterable(vals))) != {int}:
        return {}
    try:
        mat = np.array(vals, dtype=np.int64)
    except OverflowError:
        return {}
    rows = np.asarray(have, dtype=np.int64)
    out = {}
    for pos, (f, code) in zip(positions, fields, strict=True):
        tokens = np.zeros(m, np.int64)
        tokens[rows] = int_tokens(f, mat[:, code[1]])  # type: ignore[index]
        out[pos] = tokens
    return out


#: Per field, the token of every small non-negative int seen so far (0: not yet
#: computed; no real value hashes to 0). Code elements and buckets are such ints.
_INT_TABLES: dict[str, np.ndarray] = {}
_INT_TABLE_MAX = 1 << 20


def int_tokens(field: str, values: np.ndarray) -> np.ndarray:
    """``hash_tokens(field, values)`` for an int64 array (canonical text ``str(int)``)."""
    if not len(values):
        return np.zeros(0, np.int64)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= _INT_TABLE_MAX:
        uniq, inv = np.unique(values, return_inverse=True)
        return digests(field, [str(u) for u in uniq.tolist()])[inv.reshape(-1)]
    table = _INT_TABLES.get(field)
    if table is None or len(table) <= hi:
        if len(_INT_TABLES) >= 4_096:
            _INT_TABLES.clear()
        grown = np.zeros(max(hi + 1, 64, 2 * len(table) if table is not None else 0), np.int64)
        if table is not None:
            grown[: len(table)] = table
        table = _INT_TABLES[field] = grown
    tokens = table[values]
    if not tokens.all():
        todo = np.unique(values[tokens == 0])
        table[todo] = digests(field, [str(u) for u in todo.tolist()])
        tokens = table[values]
    return tokens
