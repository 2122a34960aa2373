from __future__ import annotations

import numpy as np

from features.alignment import PairMiner

VECS = {
    "a": [1.0, 0.0, 0.0],
    "b": [0.0, 1.0, 0.0],
    "c": [0.0, 0.0, 1.0],
    "a2": [0.9, 0.1, 0.0],
    "c2": [0.1, 0.0, 0.9],
}


def embed(ids):
    return np.array([VECS.get(i, [0.0, 0.0, 0.0]) for i in ids], dtype=np.float32)


def test_trigger_is_most_similar_recent_click_of_same_user():
    m = PairMiner(embed, window=10)
    m.observe(["u", "u", "u", "v"], ["a", "b", "c", "a2"])
    pairs = m.observe(["u", "u", "v"], ["c2", "a2", "c"])
    got = [(p.trigger, p.target) for p in pairs]
    # u's window is a, b, c (c2 joins it before a2 is clicked); v only has a2.
    assert got == [("c", "c2"), ("a", "a2"), ("a2", "c")]
    assert pairs[0].similarity > 0.9


def test_non_clicks_and_unknown_items_make_no_pairs():
    m = PairMiner(embed, window=10)
    pairs = m.observe(["u"] * 4, ["a", "zzz", "a2", "b"], labels=[1, 1, 0, 1])
    assert [(p.trigger, p.target) for p in pairs] == [("a", "b")]
    assert m.recent("u") == ["a", "zzz", "b"]  # unknown items still enter the window


def test_window_and_users_are_bounded():
    m = PairMiner(embed, window=2, max_users=2, max_pairs=3)
    m.observe(["u"] * 4, ["a", "b", "c", "a2"])
    assert m.recent("u") == ["c", "a2"]  # a fell out of the window...
    pairs = m.observe(["u"], ["a"])
    assert pairs[0].trigger == "a2"  # ...so the trigger is a2, the best still there
    m.observe(["v", "w"], ["a", "b"])
    assert len(m) == 2 and m.recent("u") == []  # u was least recently active
    assert len(m.pairs) == 3 and m.n_pairs_total == 4


def test_reclick_moves_item_to_front_without_self_pair():
    m = PairMiner(embed, window=3)
    pairs = m.observe(["u", "u", "u"], ["a", "b", "a"])
    assert all(p.trigger != p.target for p in pairs)
    assert m.recent("u") == ["b", "a"]
