"""Steps of a sane size at any event rate, and the served-lag AUC (what serving gets)."""

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from headwater.testing import ManualClock
from learner.models import DenseNorm
from learner.service import LearnerService
from learner.store import LocalModelStore
from learner.trainer import ServedLag, TrainerSettings
from tests.learner.synth import SCHEMA_JSON, TINY_HEAD, make_payload

SETTINGS = TrainerSettings(head=TINY_HEAD, embedding={"buckets": 64}, lr=1e-2,
                           reference_rows=64, dense_norm=True, wide=True,
                           served_lag={"delay": 1.0})


def service(tmp_path, clock, **kw):
    kw.setdefault("publish_every_seconds", None)
    kw.setdefault("registry", CollectorRegistry())
    return LearnerService(LocalModelStore(tmp_path, "ranker"), SETTINGS.factory(), clock=clock, **kw)


def test_messages_accumulate_until_the_step_size(tmp_path):
    clock = ManualClock(0.0)
    svc = service(tmp_path, clock, step_rows=64, step_wait_seconds=10.0)
    for i in range(3):
        assert svc.process(make_payload(20, offset=20 * i), position=("tb", 0, i + 1)) is None
    assert svc.pending_rows == 60 and svc.trainer.rows_trained == 0
    assert svc.consumer_positions == {}, "no position is recorded for rows not trained"
    res = svc.process(make_payload(20, offset=60), position=("tb", 0, 4))
    assert res is not None and res.rows_trained == 80 and svc.trainer.batches == 1
    assert svc.consumer_positions == {"tb:0": 4}
    assert svc.pending_rows == 0


def test_a_slow_stream_steps_at_the_deadline(tmp_path):
    clock = ManualClock(0.0)
    svc = service(tmp_path, clock, step_rows=256, step_wait_seconds=2.0)
    svc.process(make_payload(3, offset=0), position=("tb", 0, 1))
    clock.advance(1.9)
    assert svc.tick() is None and svc.pending_rows == 3
    clock.advance(0.1)
    res = svc.tick()
    assert res is not None and res.rows_trained == 3 and svc.consumer_positions == {"tb:0": 1}


def test_a_publication_never_covers_waiting_rows(tmp_path):
    clock = ManualClock(0.0)
    svc = service(tmp_path, clock, step_rows=64, step_wait_seconds=10.0)
    svc.process(make_payload(64, offset=0), position=("tb", 0, 1))  # trained
    svc.process(make_payload(10, offset=64), position=("tb", 0, 2))  # waiting
    manifest = svc.publish()
    assert manifest["rows_trained"] == 64
    assert manifest["watermarks"] == {"clicks:0": {"offset": 63, "sub": 1}}
    resumed = service(tmp_path, clock, step_rows=64, step_wait_seconds=10.0)
    assert resumed.consumer_positions == {"tb:0": 1}, "a restart re-reads the waiting message"


def test_a_message_read_twice_while_waiting_is_trained_once(tmp_path):
    clock = ManualClock(0.0)
    svc = service(tmp_path, clock, step_rows=1000, step_wait_seconds=10.0)
    p = make_payload(30, offset=0)
    svc.process(p)
    svc.process(p)  # a re-seek re-delivered it before the step ran
    res = svc.flush()
    assert res.rows_trained == 30 and res.rows_duplicate == 30


def test_learning_rates_scale_with_the_step_size():
    trainer = SETTINGS.build(SCHEMA_JSON)
    learner = trainer.learner
    base = [[g["lr"] for g in o.param_groups] for o in (learner.optimizer, learner.sparse_optimizer)]
    from learner.batch import decode_batch

    learner.learn_many(decode_batch(make_payload(16)))
    got = [[g["lr"] for g in o.param_groups] for o in (learner.optimizer, learner.sparse_optimizer)]
    assert got == [[lr * 16 / 64 for lr in b] for b in base]
    learner.learn_many(decode_batch(make_payload(128, offset=16)))
    got = [[g["lr"] for g in o.param_groups] for o in (learner.optimizer, learner.sparse_optimizer)]
    assert got == base, "a full step (or larger) runs at the configured rates"


def test_dense_norm_standardises_with_running_moments():
    norm = DenseNorm(2)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal([5.0, -1.0], [3.0, 0.1], size=(4000, 2)).astype(np.float32))
    for chunk in torch.split(x, 256):
        norm.update(chunk)
    z = norm(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(2), atol=1e-3, rtol=0)


def test_wide_model_scores_the_same_in_training_and_serving(tmp_path):
    """The training forward (score_and_learn) equals a fresh eval forward of the same
    weights: dense statistics move only after the step."""
    trainer = SETTINGS.build(SCHEMA_JSON)
    from learner.batch import decode_batch

    for i in range(3):
        trainer.step(decode_batch(make_payload(64, offset=64 * i, seed=i)))
    b = decode_batch(make_payload(64, offset=192, seed=9))
    before = trainer.learner.predict_proba_many(b)
    np.testing.assert_allclose(trainer.step(b).scores, before, rtol=1e-5, atol=1e-6)


def test_served_lag_scores_with_the_published_snapshot_after_the_delay(tmp_path):
    clock = ManualClock(0.0)
    svc = service(tmp_path, clock, step_rows=1, step_wait_seconds=0.0)
    svc.process(make_payload(64, offset=0))
    served = svc.trainer.served
    assert served.metrics.rows == 0, "nothing published: serving has no model to score with"
    svc.publish()
    snapshot = {k: v.clone() for k, v in svc.trainer.learner.model.state_dict().items()
                if isinstance(v, torch.Tensor)}
    clock.advance(0.5)  # published, not loaded yet
    svc.process(make_payload(64, offset=64, seed=1))
    assert served.metrics.rows == 0
    clock.advance(0.5)
    b = make_payload(64, offset=128, seed=2)
    from learner.batch import decode_batch
    from learner.models import build_model

    ref = build_model(svc.trainer.learner.model.spec.to_dict())
    ref.load_state_dict(snapshot)
    ref.eval()
    dec = decode_batch(b)
    with torch.no_grad():
        expected = torch.sigmoid(ref.logits(dec.categorical, dec.dense)).numpy()
    served.history = []
    svc.process(b)
    assert served.metrics.rows == 64
    np.testing.assert_allclose(served.history[0], expected, rtol=1e-5, atol=1e-6)
    live = svc.trainer.learner.predict_proba_many(dec)
    assert not np.allclose(live, expected), "the live weights moved on: the lag is real"
    status = svc.status()
    assert status["served_auc"] is not None and status["pending_rows"] == 0


def test_served_lag_sample_must_be_a_share():
    with pytest.raises(ValueError, match="sample"):
        ServedLag(sample=0.0)
