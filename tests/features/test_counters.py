from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pytest

from features.counters import (
    CounterConfig,
    CounterSpec,
    Refs,
    RequestSlots,
    aggregate,
    as_columns,
    decay_state,
    derive_features,
    resolve_refs,
)


def test_spec_validation_and_context_shorthand():
    assert CounterSpec("device", key_from_context="device").key == ("context.device",)
    with pytest.raises(ValueError, match="unknown key field"):
        CounterSpec("x", key=("nope",))
    with pytest.raises(ValueError, match="duplicate"):
        CounterConfig(specs=(CounterSpec("a"), CounterSpec("a")))


def test_state_fields_and_feature_names_follow_half_lives():
    cfg = CounterConfig(specs=(CounterSpec("user", key=("user_id",)),), half_lives=(60, 7200))
    assert cfg.state_fields == ("n", "c", "n@60", "c@60", "n@7200", "c@7200", "t")
    assert "user_ctr_2h" in cfg.feature_names() and "user_impressions_1m" in cfg.feature_names()


def test_refs_cover_products_of_multi_valued_keys_and_skip_missing_keys():
    cfg = CounterConfig(
        specs=(
            CounterSpec("user_genre", key=("user_id", "genre")),
            CounterSpec("device", key_from_context="device"),
            CounterSpec("all"),
        )
    )
    cols = as_columns(
        {
            "ts": [0.0, 1.0],
            "user_id": [1, 2],
            "item_id": [10, 11],
            "context": [{"device": "ios"}, None],
        }
    )
    refs = resolve_refs(cfg, cols, {"10": {"genres": ["A", "B"]}, "11": {"tags": ["C"]}})
    got = [(int(e), refs.entities[k]) for e, k in zip(refs.event, refs.entity, strict=True)]
    assert got == [
        (0, "user_genre:1|A"),
        (0, "user_genre:1|B"),
        (0, "device:ios"),
        (0, "all"),
        (1, "user_genre:2|C"),
        (1, "all"),
    ]


def test_hour_and_weekday_are_utc_calendar_values():
    ts = [0.0, 1_700_000_000.0, 881_250_949.0]
    cfg = CounterConfig(specs=(CounterSpec("h", key=("hour", "weekday")),))
    refs = resolve_refs(cfg, as_columns({"ts": ts}))
    for name, t in zip(refs.entities, ts, strict=True):
        d = dt.datetime.fromtimestamp(t, dt.UTC)
        assert name == f"h:{d.hour}|{d.weekday()}"


def test_decay_matches_half_life_definition_and_never_goes_backwards():
    cfg = CounterConfig(specs=(CounterSpec("x"),), half_lives=(100.0,))
    state = np.array([[4.0, 2.0, 8.0, 6.0, 1000.0], [1.0, 1.0, 1.0, 1.0, np.nan]])
    after = decay_state(cfg, state, np.array([1100.0, 5.0]))
    assert after[0].tolist() == [4.0, 2.0, 4.0, 3.0]  # one half-life: halved, totals kept
    assert after[1].tolist() == [1.0, 1.0, 1.0, 1.0]
    before = decay_state(cfg, state[:1], 900.0)  # asked for a time before t: as stored
    assert before[0].tolist() == [4.0, 2.0, 8.0, 6.0]


def test_smoothed_ctr_formula_and_pooling():
    cfg = CounterConfig(
        specs=(CounterSpec("genre", key=("genre",)),), half_lives=(3600,), alpha=4.0, prior=0.25
    )
    cols = as_columns({"ts": [0.0], "item_id": [1]})
    refs = resolve_refs(cfg, cols, {"1": {"genres": ["A", "B"]}})
    per_ref = np.array([[10.0, 3.0, 5.0, 1.0], [6.0, 1.0, 2.0, 2.0]])
    f = derive_features(cfg, aggregate(refs, per_ref))
    assert f["genre_impressions_total"][0] == 16.0
    assert math.isclose(f["genre_ctr_total"][0], (4 + 4 * 0.25) / (16 + 4))
    assert math.isclose(f["genre_ctr_1h"][0], (3 + 1.0) / (7 + 4))


def test_as_columns_accepts_rows_arrow_and_flattened_context():
    rows = [{"ts": 1, "user_id": 3, "item_id": "9", "label": 1, "context.device": "web"}]
    c = as_columns(rows)
    assert c["context"] == [{"device": "web"}] and c["user_id"].tolist() == ["3"]
    t = pa.table(
        {
            "ts": [1.0, 2.0],
            "user_id": [1, 2],
            "item_id": [5, 6],
            "offset": [3, 3],
            "sub": [0, 1],
            "label": [0, 1],
        }
    )
    c = as_columns(t)
    assert c["offset"].tolist() == [3, 3] and c["sub"].dtype == np.int32
    with pytest.raises(ValueError, match="'ts'"):
        as_columns({"user_id": [1]})


class _Slots:
    """Entity slots as a read cache numbers them; ``renumber`` starts a new generation."""

    def __init__(self) -> None:
        self.generation, self.ids = 0, {}

    def slot(self, name: str) -> int:
        return self.ids.setdefault(name, len(self.ids))

    def renumber(self) -> None:
        self.generation, self.ids = self.generation + 1, {}


def _same_slot_refs(got, want, slots: _Slots) -> None:
    """Slot references name the general path's entities, reference by reference."""
    names = {k: e for e, k in slots.ids.items()}
    assert got.entities == [] and (got.n_events, got.n_specs) == (want.n_events, want.n_specs)
    assert got.event.tolist() == want.event.tolist() and got.spec.tolist() == want.spec.tolist()
    assert [names[k] for k in got.entity.tolist()] == [want.entities[k] for k in want.entity.tolist()]


def test_request_refs_equal_the_general_path_on_random_requests():
    """Scoring requests (each one user, context and time; many items), alone or read
    together: the per-item templates give exactly the general path's references, for
    every kind of key field."""
    rng = np.random.default_rng(5)
    cfg = CounterConfig(specs=(
        CounterSpec("user", key=("user_id",)), CounterSpec("item", key=("item_id",)),
        CounterSpec("genre", key=("genre",)), CounterSpec("user_genre", key=("user_id", "genre")),
        CounterSpec("hour", key=("hour",)), CounterSpec("device", key_from_context="device"),
        CounterSpec("all"), CounterSpec("tag_year", key=("tag", "year", "weekday")),
        CounterSpec("studio", key=("item.studio", "context.device", "user_id")),
        CounterSpec("seg", key=("user.segment", "item_id")),
    ))
    values = ["A", "B", "C", 7, 7.0, 2.5, "", None, True]
    attrs = {}
    for i in range(30):
        a = {}
        for key in ("genres", "tags", "year", "studio"):
            if rng.random() < 0.7:
                pick = [values[k] for k in rng.integers(0, len(values), rng.integers(0, 4))]
                a[key] = pick if rng.random() < 0.6 else pick[0] if pick else None
        attrs[str(i)] = a or None
    planner, slots = RequestSlots(cfg), _Slots()
    requests = []
    for case in range(60):
        n = 1 if case % 3 == 0 else int(rng.integers(2, 40))  # one candidate: its own path
        items = [int(i) if rng.random() < 0.5 else str(i) for i in rng.integers(0, 40, n)]
        user = [7, "u3", "", None][case % 4]
        ctx = [{"device": "tv"}, {"device": 3}, None, {"other": "x"}][case // 4 % 4]
        raw = {"ts": np.full(n, 1_700_000_000.0 + case * 3607.5), "user_id": [user] * n,
               "item_id": items, "context": [ctx] * n,
               "user": [[{"segment": "s1"}, None, {"segment": 4}][case % 3]] * n}
        requests.append(raw)
        cols = as_columns(raw)
        want = resolve_refs(cfg, cols, attrs)
        _same_slot_refs(planner.refs(cols, attrs, slots.slot, slots.generation), want, slots)
        if case % 7 == 6:  # slots numbered anew: every item's template is rebuilt
            slots.renumber()
            _same_slot_refs(planner.refs(cols, attrs, slots.slot, slots.generation), want, slots)
        if case % 10 == 9:  # a re-read item (a new attributes object) is recomputed
            key = str(items[0])
            attrs[key] = {"genres": ["Z", 9]}
            want = resolve_refs(cfg, cols, attrs)
            _same_slot_refs(planner.refs(cols, attrs, slots.slot, slots.generation), want, slots)
    # requests read together (each a run), and events that share nothing (runs of one)
    for k in range(0, 60, 6):
        group = requests[k:k + 1 + k % 5]  # 1 to 5 requests
        cols = as_columns({f: np.concatenate([r[f] for r in group]) if f == "ts"
                           else [v for r in group for v in r[f]] for f in group[0]})
        _same_slot_refs(planner.refs(cols, attrs, slots.slot, slots.generation),
                        resolve_refs(cfg, cols, attrs), slots)
    for raw in ({"ts": [0.0, 1.0], "user_id": [1, 1], "item_id": [2, 3]},
                {"ts": [0.0, 0.0], "user_id": [1, 2], "item_id": [2, 3]},
                {"ts": [0.0, 0.0, 0.0], "user_id": [1, 1, 1], "item_id": [2, 3, 2],
                 "context": [{"device": "tv"}, {"device": "tv"}, {"device": 3}]},
                {"ts": [], "user_id": [], "item_id": []}):
        cols = as_columns(raw)
        _same_slot_refs(planner.refs(cols, attrs, slots.slot, slots.generation),
                        resolve_refs(cfg, cols, attrs), slots)


def test_aggregate_sums_references_in_order_to_the_bit():
    """``aggregate`` adds each (event, spec)'s references in their order, as ``np.add.at``
    does: the same float64 sums, not merely close ones."""
    rng = np.random.default_rng(11)
    n, specs = 50, 4
    event = np.sort(rng.integers(0, n, 400))
    refs = Refs(entities=[], event=event, spec=rng.integers(0, specs, 400).astype(np.int32),
                entity=np.zeros(400, np.int32), n_events=n, n_specs=specs)
    per_ref = rng.uniform(0, 1e6, (400, 6)) ** rng.uniform(0.1, 2.0, (400, 6))
    want = np.zeros((n * specs, 6))
    np.add.at(want, refs.event * specs + refs.spec, per_ref)
    got = aggregate(refs, per_ref)
    assert got.shape == (n, specs, 6) and np.array_equal(got.reshape(-1, 6), want)
    assert aggregate(Refs([], event[:0], refs.spec[:0], refs.entity[:0], 3, specs),
                     per_ref[:0]).shape == (3, specs, 6)
