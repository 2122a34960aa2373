import math

import numpy as np
import pytest
import torch

from learner.batch import decode_batch
from learner.metrics import ColdItemTracker, PrequentialMetrics, exact_auc
from learner.protocol import Rows, take
from learner.trainer import SchemaMismatchError, TrainerSettings
from tests.learner.synth import SCHEMA_JSON, TINY_HEAD, make_payload


def tiny_trainer(**kw):
    settings = TrainerSettings(
        **{"head": TINY_HEAD, "embedding": {"buckets": 64}, "lr": 1e-2, **kw}
    )
    return settings.build(SCHEMA_JSON)


def weights(trainer):
    return {
        k: v.clone()
        for k, v in trainer.learner.model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }


def test_scores_before_training():
    tr = tiny_trainer()
    batch = decode_batch(make_payload(32, seed=3))
    before = tr.learner.predict_proba_many(batch)
    result = tr.step(batch)
    np.testing.assert_allclose(result.scores, before, rtol=1e-5, atol=1e-6)
    after = tr.learner.predict_proba_many(batch)
    assert not np.allclose(after, before)


def test_scores_before_training_with_batchnorm_too():
    tr = tiny_trainer(head={**TINY_HEAD, "conv_batchnorm": True})
    batch = decode_batch(make_payload(32, seed=3))
    before = tr.learner.predict_proba_many(batch)
    np.testing.assert_allclose(tr.step(batch).scores, before, rtol=1e-5, atol=1e-6)


def test_same_batch_twice_trains_once():
    tr = tiny_trainer()
    payload = make_payload(40, offset=0)
    first = tr.step(decode_batch(payload))
    w = weights(tr)
    second = tr.step(decode_batch(payload))
    assert (first.rows_trained, second.rows_trained, second.rows_duplicate) == (40, 0, 40)
    assert tr.rows_trained == 40 and tr.rows_dropped["duplicate"] == 40
    assert all(torch.equal(w[k], v) for k, v in weights(tr).items())
    assert tr.watermarks[("clicks", 0)] == (39, 1)


def test_partial_overlap_trains_only_new_rows():
    tr = tiny_trainer()
    tr.step(decode_batch(make_payload(30, offset=0)))
    res = tr.step(decode_batch(make_payload(30, offset=20)))  # rows 20..49
    assert (res.rows_duplicate, res.rows_trained) == (10, 20)
    assert res.kept.tolist() == [False] * 10 + [True] * 20
    assert tr.rows_trained == 50 and tr.metrics.rows == 50
    other = tr.step(decode_batch(make_payload(30, offset=0, partition=1)))  # another partition
    assert other.rows_trained == 30


def test_schema_change_is_refused():
    tr = tiny_trainer()
    tr.step(decode_batch(make_payload(8)))
    other = SCHEMA_JSON.replace('"version":1', '"version":2')
    with pytest.raises(SchemaMismatchError, match="schema"):
        tr.step(decode_batch(make_payload(8, offset=8, schema_json=other)))
    assert tr.rows_dropped["schema"] == 8


def test_downsampling_keeps_positives_and_corrects_log_odds():
    # Trained on 1/4 of the negatives, an uncorrected model would predict ~0.8 here
    # (odds x 4); the -log(r) shift keeps it at the true base rate (~0.51).
    tr = TrainerSettings(
        kind="lr",
        embedding={"buckets": 1},
        lr=1e-2,
        downsample={"backlog_threshold": 100, "negative_rate": 0.25},
    ).build(SCHEMA_JSON)
    rng = np.random.default_rng(0)
    offset = 0
    for _ in range(150):
        payload = make_payload(128, offset=offset, seed=int(rng.integers(1 << 30)))
        batch = decode_batch(payload)
        res = tr.step(batch, backlog=1000)
        assert res.rows_trained >= int(batch.labels.sum())
        offset += 128
    assert tr.rows_dropped["downsampled"] > 0
    probe = decode_batch(make_payload(4000, offset=offset, seed=7))
    mean_pred = tr.learner.predict_proba_many(probe).mean()
    assert abs(mean_pred - probe.labels.mean()) < 0.04


def test_no_downsampling_below_threshold():
    tr = tiny_trainer(downsample={"backlog_threshold": 100, "negative_rate": 0.25})
    res = tr.step(decode_batch(make_payload(64)), backlog=50)
    assert res.rows_downsampled == 0 and res.rows_trained == 64


def test_metrics_and_drift():
    m = PrequentialMetrics(window=50)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    good = np.where(y == 1, 0.9, 0.1)
    assert m.update(y[:1000], good[:1000]) == 0
    drifts = m.update(y[1000:], 1 - good[1000:])  # the model turns bad: loss jumps
    assert drifts >= 1 and m.drift_total == drifts
    snap = m.snapshot()
    assert snap["rows_scored"] == 2000 and snap["rolling_auc"] < 0.1
    restored = PrequentialMetrics(window=50)
    restored.load_state(m.state())
    assert restored.snapshot()["auc"] == pytest.approx(snap["auc"])
    assert restored.snapshot()["logloss"] == pytest.approx(snap["logloss"])
    assert restored.drift_total == m.drift_total


def test_cold_item_tracker_counts_across_batches():
    t = ColdItemTracker(k=2)
    t.update(np.array([1, 1, 1]), np.array([1, 0, 1]), np.array([0.9, 0.1, 0.2]))
    t.update(np.array([1, 2]), np.array([0, 1]), np.array([0.5, 0.6]))
    assert t.rows == 3  # item 1's first two, item 2's first
    assert t.seen == {1: 4, 2: 1}


def test_exact_auc_handles_ties_and_one_class():
    assert exact_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(exact_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_take_selects_rows():
    r = Rows(
        np.arange(6).reshape(3, 2),
        np.zeros((3, 1), np.float32),
        np.array([1, 0, 1]),
        np.arange(3.0),
    )
    sub = take(r, np.array([0, 2]))
    assert sub.categorical.tolist() == [[0, 1], [4, 5]] and sub.ts.tolist() == [0.0, 2.0]
