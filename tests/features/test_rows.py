from __future__ import annotations

import itertools

import numpy as np
import pytest

from features.counters import CounterConfig, CounterSpec, derive_features
from features.hashing import hash_token
from features.rows import RowBuilder, RowConfig

CFG = CounterConfig(
    specs=(
        CounterSpec("user", key=("user_id",)),
        CounterSpec("item", key=("item_id",)),
        CounterSpec("genre", key=("genre",)),
    ),
    half_lives=(3600.0,),
)
ROWS = RowConfig(
    counters=CFG, context_fields=("hour", "weekday", "device"), code_fields=("rq0", "rq1", "vq")
)
ITEMS = {"10": {"genres": ["Comedy", "Drama"], "year": 1995}, "11": {"tags": ["Horror"]}}


def _events():
    return {
        "event_id": ["a", "b", "c"],
        "ts": [3600.0 * 25 + 5, 7200.0, 7300.0],
        "user_id": [1, 2, 1],
        "item_id": [10, 11, 12],
        "label": [1, 0, 1],
        "offset": [4, 4, 5],
        "sub": [0, 1, 0],
        "user": [{"age": 24, "gender": "M", "zip_code": "85711"}, {"age": 60}, None],
        "context": [{"device": "ios"}, None, None],
    }


def _features(n, cfg=CFG, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(0, 50, n) for k in cfg.feature_names()}


def test_columns_match_the_train_batch_contract():
    rb = RowBuilder(ROWS)
    cols = rb.build(_events(), _features(3), ITEMS, {"10": {"rq": [7, 8], "vq": [3]}})
    fixed = ["event_id", "ts", "label", "offset", "sub"]
    assert list(cols) == fixed + rb.schema.columns
    assert cols["label"].dtype == np.int8 and cols["sub"].dtype == np.int32
    for name in rb.schema.columns:
        assert cols[name].dtype == (np.int64 if name.startswith("c:") else np.float32), name
        assert cols[name].shape == (3,)


def test_tokens_carry_attributes_context_and_codes_with_zero_for_missing():
    rb = RowBuilder(ROWS)
    cols = rb.build(_events(), _features(3), ITEMS, {"10": {"rq": [7, 8], "vq": [3]}})
    assert cols["c:user_id"].tolist() == [hash_token("user_id", u) for u in (1, 2, 1)]
    assert cols["c:age"].tolist() == [hash_token("age", "18"), hash_token("age", "56"), 0]
    assert cols["c:zip3"].tolist() == [hash_token("zip3", "857"), 0, 0]
    assert cols["c:genre"].tolist() == [
        hash_token("genre", "Comedy"),
        hash_token("genre", "Horror"),
        0,
    ]
    assert cols["c:year"].tolist() == [hash_token("year", 1995), 0, 0]
    assert cols["c:hour"].tolist() == [hash_token("hour", h) for h in (1, 2, 2)]
    assert cols["c:weekday"][0] == hash_token("weekday", 4)  # 1970-01-02 was a Friday
    assert cols["c:device"].tolist() == [hash_token("device", "ios"), 0, 0]
    assert cols["c:rq1"].tolist() == [hash_token("rq1", 8), 0, 0]
    assert cols["c:vq"].tolist() == [hash_token("vq", 3), 0, 0]


def test_counter_buckets_and_dense_values():
    feats = {k: np.zeros(3) for k in CFG.feature_names()}
    feats["item_impressions_total"] = np.array([0.0, 1.0, 1000.0])
    feats["item_ctr_total"] = np.array([0.5, 0.05, 0.95])
    cols = RowBuilder(ROWS).build(_events(), feats, ITEMS)
    assert cols["c:item_imp_bucket"].tolist() == [
        hash_token("item_imp_bucket", b) for b in (0, 1, 9)
    ]
    assert cols["c:item_ctr_bucket"].tolist() == [
        hash_token("item_ctr_bucket", b) for b in (-1, 0, 9)
    ]
    np.testing.assert_allclose(
        cols["d:log1p_item_impressions_total"], np.log1p([0, 1, 1000]), rtol=1e-6
    )
    np.testing.assert_allclose(cols["d:item_ctr_total"], [0.5, 0.05, 0.95], rtol=1e-6)


def test_scoring_builds_the_same_columns_as_training():
    rb = RowBuilder(ROWS)
    user = {"age": 24, "gender": "M", "zip_code": "85711"}
    items = [10, 11, 12]
    feats = _features(3, seed=1)
    train = rb.build(
        {
            "event_id": ["x"] * 3,
            "ts": [7200.0] * 3,
            "user_id": [1] * 3,
            "item_id": items,
            "label": [0] * 3,
            "offset": [0] * 3,
            "user": [user] * 3,
            "context": [{"device": "web"}] * 3,
        },
        feats,
        ITEMS,
        {"10": {"rq": [1]}},
    )
    serve_feats = {
        **feats,
        "item_attrs": [ITEMS.get(str(i)) for i in items],
        "codes": [{"rq": [1]}, None, None],
        "user_attrs": [user] * 3,
    }
    score = rb.build_for_scoring(1, None, {"device": "web"}, items, serve_feats, now=7200.0)
    assert list(score) == rb.schema.columns
    for name in rb.schema.columns:
        np.testing.assert_array_equal(score[name], train[name], err_msg=name)


def test_round_trip_through_the_learner_codec():
    batch = pytest.importorskip("learner.batch")
    rb = RowBuilder(ROWS)
    cols = rb.build(_events(), _features(3), ITEMS)
    payload = batch.encode_batch(cols, rb.schema.to_json(), rb.schema.hash, "clicks", 0, 4, 6)
    out = batch.decode_batch(payload)
    assert out.categorical_fields == rb.schema.categorical and out.dense_names == rb.schema.dense
    np.testing.assert_array_equal(out.categorical[:, 0], cols["c:user_id"])
    np.testing.assert_array_equal(out.dense[:, -1], cols[f"d:{rb.schema.dense[-1]}"])
    assert out.offsets.tolist() == [4, 4, 5] and out.subs.tolist() == [0, 1, 0]


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="bucket_counters"):
        RowBuilder(RowConfig(counters=CFG, bucket_counters=("nope",)))
    with pytest.raises(KeyError, match="pre-event features lack"):
        RowBuilder(ROWS).build(_events(), {}, ITEMS)


def test_scoring_item_blocks_are_cached_per_item_and_follow_new_attributes():
    """Item tokens computed once per item are the shared path's tokens; a new attributes
    object (the store re-read the item) recomputes them, the same object never does."""
    from features.counters import CounterConfig, CounterSpec

    cfg = RowConfig(counters=CounterConfig(specs=(CounterSpec("item", key=("item_id",)),),
                                           half_lives=()), code_fields=("rq0", "rq1", "vq"))
    items = ["a", "b", "a", "zz"]
    attrs = {"a": {"genres": ["Drama"], "year": 1999}, "b": {"tags": ["Comedy"]}}
    codes = {"a": {"rq": [3, 4], "vq": [9]}, "b": {"rq": [5, 6]}}
    feats = {"item_impressions_total": np.zeros(4), "item_clicks_total": np.zeros(4),
             "item_ctr_total": np.full(4, 0.1),
             "item_attrs": [attrs.get(i) for i in items], "codes": [codes.get(i) for i in items]}

    def score(rb):
        return rb.build_for_scoring(1, {"age": 30}, None, items, feats, now=7200.0)

    rb = RowBuilder(cfg)
    first = score(rb)
    again = score(rb)  # from the cache
    fresh = score(RowBuilder(cfg))
    train = rb.build({"event_id": ["e"] * 4, "ts": [7200.0] * 4, "user_id": [1] * 4,
                      "item_id": items, "label": [0] * 4, "offset": [0, 1, 2, 3],
                      "user": [{"age": 30}] * 4},
                     {k: v for k, v in feats.items() if k.startswith("item_")}, attrs, codes)
    for col in first:
        assert np.array_equal(first[col], again[col]), col
        assert np.array_equal(first[col], fresh[col]), col
        assert np.array_equal(first[col], train[col]), col
    assert first["c:item_id"][0] == first["c:item_id"][2] != first["c:item_id"][1]
    assert first["c:genre"][3] == first["c:rq0"][3] == 0  # unknown item: missing tokens
    attrs["a"] = {"genres": ["Horror"], "year": 1999}  # a re-read: a new object
    feats["item_attrs"] = [attrs.get(i) for i in items]
    changed = score(rb)
    assert changed["c:genre"][0] == changed["c:genre"][2] == score(RowBuilder(cfg))["c:genre"][0]
    assert changed["c:genre"][0] != first["c:genre"][0]
    assert changed["c:year"][0] == first["c:year"][0]


def test_score_matrices_are_the_scoring_columns_stacked():
    """The matrices the scorer feeds the model equal build_for_scoring's columns in schema
    order (user, context and time broadcast; items from their blocks; buckets, dense)."""
    rb = RowBuilder(ROWS)
    items = [10, 11, 12, 10, "new"]
    extra = {"item_attrs": [ITEMS.get(str(i)) for i in items],
             "codes": [{"rq": [1, 2], "vq": [4]}, None, None, {"rq": [1, 2], "vq": [4]}, None],
             "user_attrs": [{"age": 41, "zip_code": "10001", "gender": "F"}] * 5}
    feats = {**_features(5, seed=3), **extra}
    feats["user_impressions_total"][1] = 0.0  # no history: ctr bucket -1
    # as the online store answers: derive_features's block, the other answers added to it
    agg = np.random.default_rng(4).uniform(0, 50, (5, len(CFG.specs), CFG.width))
    agg[1, 0, 0] = 0.0  # no history: ctr bucket -1
    derived = derive_features(CFG, agg)
    derived.update(extra)
    users = ((1, {"device": "web"}), ("u2", None))
    for (user, ctx), now, got in itertools.product(users, (7200.0, 1_700_003_333.0),
                                                   (feats, derived)):
        cols = rb.build_for_scoring(user, None, ctx, items, got, now=now)
        cat, dense = rb.score_matrices(user, None, ctx, items, got, now=now)
        assert cat.dtype == np.int64 and dense.dtype == np.float32
        for j, f in enumerate(rb.schema.categorical):
            np.testing.assert_array_equal(cat[:, j], cols[f"c:{f}"], err_msg=f)
        for j, d in enumerate(rb.schema.dense):
            np.testing.assert_array_equal(dense[:, j], cols[f"d:{d}"], err_msg=d)
    # the user's columns are kept per (user, attributes, context, hour): a second request
    # reuses them, and attributes that only compare equal (1, 1.0, True) are kept apart
    for attrs in ({"age": 1}, {"age": 1.0}, {"age": True}, {"age": 1}):
        for builder in (rb, RowBuilder(ROWS)):  # warm and fresh
            cols = builder.build_for_scoring("u3", attrs, None, items, feats, now=7200.0)
            cat, _ = rb.score_matrices("u3", attrs, None, items, feats, now=7200.0)
            for j, f in enumerate(rb.schema.categorical):
                np.testing.assert_array_equal(cat[:, j], cols[f"c:{f}"], err_msg=f)
    empty = {k: np.zeros(0) for k in CFG.feature_names()}
    cat, dense = rb.score_matrices(1, None, None, [], empty, now=1.0)
    assert cat.shape == (0, len(rb.schema.categorical)) and dense.shape == (0, len(rb.schema.dense))


def test_user_tokens_per_distinct_user_equal_the_per_event_ones():
    """Tokens given per user id (its first event's attributes) must be the per-event ones,
    whatever the other events of that user carry."""
    from features.rows import _user_tokens, _users_tokens

    users = [
        {"age": 25, "gender": "M", "zip_code": "55105"},
        {"age": 25, "gender": "M", "zip_code": "55105"},   # same as its user's first
        {"age": 25.0, "gender": "M", "zip_code": "55105"},  # == the first, same texts
        {"age": 33, "gender": "F", "zip": "1234"},           # differs from its user's first
        None,
        {},
        {"age": True, "gender": "M"},                        # True == 1: must not take 1's token
        {"age": 1, "gender": "M"},
        {"age": 1, "gender": True},
        {"age": 1.0, "gender": 1},
        {"age": float("nan"), "gender": "M"},
        {"age": float("nan"), "gender": "M"},
        {"occupation": "writer", "zip_code": None, "zip": "999"},
        {"occupation": "writer", "zip": "999"},
    ]
    user_ids = ["1", "1", "1", "1", "2", "2", "3", "3", "4", "4", "5", "5", "6", "6"]
    fields = ("age", "gender", "occupation", "zip3")
    for ids in (user_ids, user_ids[::-1]):
        us = users if ids is user_ids else users[::-1]
        col = np.array(ids, dtype=object)
        col.flags.writeable = False
        got = _users_tokens(fields, us, col)
        for f in fields:
            assert got[f"c:{f}"].tolist() == _user_tokens(f, us).tolist(), f
    assert _users_tokens(fields, users[:1], np.array(["1"], dtype=object))["c:age"].tolist() \
        == _user_tokens("age", users[:1]).tolist()
    assert _users_tokens((), users, np.array(user_ids, dtype=object)) == {}


def test_scoring_item_blocks_stay_right_as_the_item_table_grows():
    """Thousands of items (the table grows past its first size, rows are reused per
    item): every block is the one a fresh builder computes, also for items without
    attributes or codes, which share the ``None`` objects."""
    cfg = RowConfig(code_fields=("rq0", "vq"))
    rng = np.random.default_rng(3)
    items = [f"i{k}" for k in range(3000)]
    attrs = [None if k % 3 else {"genres": [f"g{k % 7}"], "year": 1990 + k % 20} for k in range(3000)]
    codes = [None if k % 2 else {"rq": [k % 11, 1], "vq": [k % 5]} for k in range(3000)]
    rb = RowBuilder(cfg)
    for _ in range(2):
        order = rng.permutation(3000)[:2500]
        got = rb.item_blocks([items[k] for k in order], [attrs[k] for k in order],
                             [codes[k] for k in order])
        want = RowBuilder(cfg).item_blocks([items[k] for k in order], [attrs[k] for k in order],
                                           [codes[k] for k in order])
        assert np.array_equal(got, want)
    attrs[0] = {"genres": ["other"]}  # a re-read: recomputed
    got = rb.item_blocks(items[:1], attrs[:1], codes[:1])
    assert np.array_equal(got, RowBuilder(cfg).item_blocks(items[:1], attrs[:1], codes[:1]))
