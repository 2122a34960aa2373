"""Rows equal a per-row reference, token by token, on real MovieLens batches and odd inputs.

The reference is the row builder's specification written out one row and one field at
a time with :func:`features.hashing.hash_token` (no factorising, no caches, no tables):
the vectorised builder must give byte-identical columns.
"""

from __future__ import annotations

import numpy as np
import pytest

from features.counters import CounterConfig, CounterSpec
from features.defaults import code_field_names
from features.hashing import canonical, hash_token
from features.movielens import click_events
from features.rows import RowBuilder, RowConfig

_EDGES = [18, 25, 35, 45, 50, 56]
_LABELS = ["1", "18", "25", "35", "45", "50", "56"]


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _user_text(f, u):
    if f == "zip3":
        raw = u.get("zip_code", u.get("zip")) if u else None
    else:
        raw = u.get(f) if u else None
    text = canonical(raw)
    if f == "age" and text:
        a = _num(text)
        return "" if np.isnan(a) else _LABELS[int(np.searchsorted(_EDGES, a, side="right"))]
    if f == "age":
        return ""
    return text[:3] if f == "zip3" else text


def _item_value(f, attrs):
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


def _code_value(cd, kind, idx):
    if not cd:
        return None
    seq = cd.get(kind)
    return seq[idx] if seq is not None and idx < len(seq) else None


def reference(rb: RowBuilder, events: dict, feats: dict, attrs: dict, codes: dict) -> dict:
    c = rb.config
    attrs = {canonical(k): v for k, v in attrs.items()}
    codes = {canonical(k): v for k, v in codes.items()}
    n = len(events["ts"])
    out: dict[str, list[int]] = {name: [] for name in rb.schema.columns if name[:2] == "c:"}
    for i in range(n):
        ts = float(events["ts"][i])
        item = canonical(events["item_id"][i])
        user = events["user"][i]
        ctx = events.get("context", [None] * n)[i]
        out["c:user_id"].append(hash_token("user_id", events["user_id"][i]))
        out["c:item_id"].append(hash_token("item_id", events["item_id"][i]))
        for f in c.user_fields:
            out[f"c:{f}"].append(hash_token(f, _user_text(f, user)))
        for f in c.item_fields:
            out[f"c:{f}"].append(hash_token(f, _item_value(f, attrs.get(item))))
        for f in c.context_fields:
            if f == "hour":
                v = int(np.floor(ts / 3600) % 24)
            elif f == "weekday":
                v = int((np.floor(ts / 86400) + 3) % 7)
            else:
                v = ctx.get(f) if ctx else None
            out[f"c:{f}"].append(hash_token(f, v))
        for spec in c.counters.specs:
            b = spec.name
            n_tot = float(feats[f"{b}_impressions_total"][i])
            ctr = float(feats[f"{b}_ctr_total"][i])
            with np.errstate(invalid="ignore"):  # NaN casts as numpy casts it, as the builder
                imp = np.minimum(np.floor(np.log2(1.0 + np.array([n_tot]))), c.max_imp_bucket)
                imp = int(imp.astype(np.int64)[0])
            ctr_b = int(np.searchsorted(np.asarray(c.ctr_edges), ctr)) if n_tot > 0 else -1
            out[f"c:{b}_imp_bucket"].append(hash_token(f"{b}_imp_bucket", imp))
            out[f"c:{b}_ctr_bucket"].append(hash_token(f"{b}_ctr_bucket", ctr_b))
        for name in c.code_fields:
            kind, idx = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")) :] or 0)
            out[f"c:{name}"].append(hash_token(name, _code_value(codes.get(item), kind, idx)))
    return {k: np.asarray(v, np.int64) for k, v in out.items()}


def _assert_same(rb, events, feats, attrs, codes):
    got = rb.build(events, feats, attrs, codes)
    want = reference(rb, events, feats, attrs, codes)
    for name, col in want.items():
        assert got[name].dtype == np.int64, name
        np.testing.assert_array_equal(got[name], col, err_msg=name)
    return got


def _features(rb, n, rng):
    feats = {}
    for k in rb.config.counters.feature_names():
        if "impressions" in k:
            feats[k] = np.floor(rng.exponential(200, n)) * (rng.random(n) > 0.2)
        else:
            feats[k] = rng.random(n)
    return feats


@pytest.fixture(scope="module")
def movielens_batches(ml):
    events = click_events(ml, 0, 12_000)
    rng = np.random.default_rng(7)
    codes = {}
    for k in list(ml.items)[::2]:  # half the items have codes
        codes[str(k)] = {"rq": rng.integers(0, 256, 3).tolist(), "vq": rng.integers(0, 1682, 8).tolist()}
    attrs = {str(k): dict(v) for k, v in list(ml.items.items())[::3]}  # a third have attributes
    return events, attrs, codes


def test_rows_equal_the_per_row_reference_on_movielens(movielens_batches):
    events, attrs, codes = movielens_batches
    rb = RowBuilder(RowConfig(code_fields=code_field_names(3, 8)))
    rng = np.random.default_rng(3)
    for start in range(0, len(events), 3000):  # caches warm across batches, as in a worker
        chunk = events[start : start + 3000]
        cols = {k: [e.get(k) for e in chunk] for k in ("event_id", "ts", "user_id", "item_id", "label", "user")}
        cols["ts"] = np.asarray(cols["ts"], np.float64)
        cols["offset"] = np.arange(len(chunk), dtype=np.int64)
        cols["sub"] = np.zeros(len(chunk), np.int32)
        _assert_same(rb, cols, _features(rb, len(chunk), rng), attrs, codes)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_rows_equal_the_reference_on_odd_inputs():
    cfg = CounterConfig(specs=(CounterSpec("item", key=("item_id",)),), half_lives=(3600.0,))
    rb = RowBuilder(
        RowConfig(counters=cfg, context_fields=("hour", "weekday", "device"),
                  code_fields=("rq0", "rq2", "vq", "vq5"), max_imp_bucket=4)
    )
    events = {
        "event_id": list("abcdefgh"),
        "ts": [5.0, 3600.0 * 30, -7200.5, 1e9, 1e9 + 1, 86400.0 * 3, 0.0, 12.0],
        "user_id": [1, "1", 2.0, "x", None, 7, True, "7"],
        "item_id": [10, "10", 11.0, 12, 13, 14, 15, "16"],
        "label": [1, 0, 1, 0, 1, 0, 1, 0],
        "offset": list(range(8)),
        "sub": [0] * 8,
        "user": [{"age": 24, "gender": "M", "zip": "857"}, {"age": "60"}, {"age": True},
                 {"age": 17.5, "occupation": 3}, None, {"age": None, "gender": b"F"},
                 {"zip_code": 12345}, {}],
        "context": [{"device": "ios"}, {"device": 1}, {"device": True}, {"device": 1.0},
                    None, {}, {"device": None}, {"device": float("nan")}],
    }
    attrs = {10: {"genres": ["Comedy"], "year": 1995}, "11": {"tags": [], "year": 1995.0},
             12: {"year": True}, "13": {"genres": "Drama", "release_year": "1999"}, 14: {}}
    codes = {10: {"rq": [1, 2, 3], "vq": [4, 5, 6, 7, 8, 9]}, "11": {"rq": [1, 2], "vq": []},
             12: {"rq": (1, 2, 3.0)}, 13: {"rq": [True, 2, 3]}, "14": {"rq": [4, 5, 6]},
             15: {"vq": np.arange(6)}}
    feats = {k: np.array([0, 1, 3, 1e6, np.nan, -0.5, 2, 15.0]) for k in cfg.feature_names()}
    feats["item_ctr_total"] = np.array([0.0, 0.05, 0.1, 0.95, 0.5, 1.0, np.nan, 0.3])
    _assert_same(rb, events, feats, attrs, codes)


def test_uniform_codes_and_plain_ints_take_the_same_tokens_as_mixed_ones():
    rb = RowBuilder(RowConfig(code_fields=("rq0", "rq1")))
    n = 4
    events = {"event_id": list("abcd"), "ts": np.zeros(n), "user_id": ["u"] * n,
              "item_id": ["1", "2", "3", "4"], "label": [0] * n, "offset": [0] * n, "sub": [0] * n,
              "user": [None] * n}
    feats = {k: np.zeros(n) for k in rb.config.counters.feature_names()}
    uniform = {"1": {"rq": [5, 6]}, "2": {"rq": [5, 7]}, "3": {"rq": [9, 6]}}
    mixed = {**uniform, "4": {"rq": [5]}}  # one short code: the general path
    a = _assert_same(rb, events, feats, {}, uniform)
    b = _assert_same(rb, events, feats, {}, mixed)
    np.testing.assert_array_equal(a["c:rq0"][:3], b["c:rq0"][:3])
