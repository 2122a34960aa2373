"""features.asof's own-shard pre-event states against a brute force, for entities
whose references go back in time within a batch (late events, unsorted logs)."""

from __future__ import annotations

import numpy as np
import pytest

from features.asof import pre_own

HL = (3600.0, 86400.0)


def _brute(ent, ts, label, ties, weight=None):
    """Every reference: the references before it (offset order) of its entity that are
    older (ties: or as old), decayed to its time (``weight``: impressions of each)."""
    weight = np.ones(len(ent)) if weight is None else weight
    out = np.zeros((len(ent), 2 + 2 * len(HL)))
    for i in range(len(ent)):
        for j in range(i):
            dt = ts[i] - ts[j]
            if ent[j] != ent[i] or not (dt >= 0 if ties else dt > 0):
                continue
            out[i, 0] += weight[j]
            out[i, 1] += label[j]
            for k, h in enumerate(HL):
                out[i, 2 + 2 * k] += weight[j] * 2 ** (-dt / h)
                out[i, 3 + 2 * k] += label[j] * 2 ** (-dt / h)
    return out


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_hot_entities_with_late_references_match_the_brute_force(ties, weighted):
    rng = np.random.default_rng(7)
    n = 700  # one hot entity of ~500 references (several halving levels), a few small ones
    ent = np.where(rng.random(n) < 0.7, 0, rng.integers(1, 12, n))
    ts = 8.8e8 + np.round(rng.random(n) * 2e5, -1)  # unsorted, with equal times
    label = rng.integers(0, 2, n).astype(float)
    # weighted: some references are clicks counted at their own time (no impression)
    weight = np.where(rng.random(n) < 0.2, 0.0, 1.0) if weighted else None
    if weighted:
        label[weight == 0] = 1.0
    states = np.full((12, 2 + 2 * len(HL) + 1), np.nan)  # nothing in the shard yet
    pre, trunc = pre_own(HL, states, {}, ent, ts, label, ties, weight=weight)
    np.testing.assert_allclose(pre, _brute(ent, ts, label, ties, weight), rtol=1e-9, atol=1e-9)
    assert not trunc.any()
