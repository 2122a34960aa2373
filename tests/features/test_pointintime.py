"""The numpy point-in-time replay against the plain per-event reference model."""

from __future__ import annotations

import numpy as np
import pytest

from features.pointintime import replay_states


def _reference(reference_counters, half_lives, init, entity, ts, label):
    ref = reference_counters(half_lives)
    for k, row in enumerate(init):
        if not np.isnan(row[-1]):
            s = ref._get(k)
            s["n"], s["c"] = row[0], row[1]
            s["dn"] = list(row[2:-1:2])
            s["dc"] = list(row[3:-1:2])
            s["t"] = row[-1]
    pre, late = [], []
    for e, t, lab in zip(entity.tolist(), ts.tolist(), label.tolist(), strict=True):
        s = ref._get(e)
        late.append(s["t"] is not None and t < s["t"])
        pre += ref.apply([e], t, lab)
    return np.asarray(pre), np.asarray(late), ref


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("half_lives", [(3600.0, 86400.0), (1.0, 7.0)])
def test_replay_matches_event_by_event_reference(seed, half_lives, reference_counters):
    rng = np.random.default_rng(seed)
    K, R = 40, 600
    W = 2 + 2 * len(half_lives)
    init = np.zeros((K, W + 1))
    init[:, 0] = rng.integers(0, 50, K)
    init[:, 1] = np.floor(init[:, 0] * rng.random(K))
    init[:, 2:W] = rng.random((K, W - 2)) * 5
    init[:, W] = 1e9 + rng.random(K) * 5000
    init[rng.random(K) < 0.3] = [0.0] * W + [np.nan]
    # Mostly increasing times with late stragglers and long gaps (many decay blocks for
    # the short half-lives).
    ts = 1e9 + np.sort(rng.random(R)) * 20000
    late = rng.random(R) < 0.15
    ts[late] -= rng.random(late.sum()) * 3000
    entity = rng.choice(K, R, p=np.r_[0.5, np.full(K - 1, 0.5 / (K - 1))])
    label = rng.integers(0, 2, R)
    got = replay_states(half_lives, init, entity, ts, label)
    want_pre, want_late, ref = _reference(reference_counters, half_lives, init, entity, ts, label)
    np.testing.assert_allclose(got.pre, want_pre, rtol=1e-9, atol=1e-12)
    assert got.late.tolist() == want_late.tolist()
    assert got.touched.tolist() == sorted(set(entity.tolist()))
    for k, row in zip(got.touched.tolist(), got.final, strict=True):
        s = ref.state[k]
        np.testing.assert_allclose(row[:-1], ref.vector(s), rtol=1e-9, atol=1e-12)
        assert row[-1] == s["t"]


def test_empty_and_far_apart_times():
    r = replay_states((60.0,), np.zeros((1, 5)), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    assert r.pre.shape == (0, 4) and r.final.shape == (0, 5)
    init = np.array([[5.0, 1.0, 3.0, 1.0, 0.0]])
    r = replay_states((60.0,), init, np.array([0, 0]), np.array([1e9, 1e9 + 60]), np.array([1, 1]))
    assert r.pre[0].tolist() == [5.0, 1.0, 0.0, 0.0]  # decayed away, no overflow or NaN
    np.testing.assert_allclose(r.pre[1], [6.0, 2.0, 0.5, 0.5], rtol=1e-12)
