import hashlib

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from learner.batch import decode_batch
from learner.service import LearnerService
from learner.store import LocalModelStore
from learner.trainer import TrainerSettings
from tests.learner.synth import SCHEMA_HASH, SCHEMA_JSON, TINY_HEAD, make_payload

SETTINGS = TrainerSettings(head=TINY_HEAD, embedding={"buckets": 64}, lr=1e-2, item_field="item")
N = 48
PAYLOADS = [make_payload(N, offset=i * N, seed=i) for i in range(5)]


def service(tmp_path, **kw):
    kw.setdefault("publish_every_seconds", None)
    kw.setdefault("registry", CollectorRegistry())
    return LearnerService(LocalModelStore(tmp_path, "ranker"), SETTINGS.factory(), **kw)


def sample(registry, name, **labels):
    return registry.get_sample_value(name, labels or None)


def test_resume_after_kill_neither_skips_nor_retrains(tmp_path):
    reference = service(tmp_path / "ref")
    for p in PAYLOADS:
        reference.process(p)

    a = service(tmp_path / "run", publish_every_rows=3 * N)
    for p in PAYLOADS[:4]:
        a.process(p)
        a.maybe_publish()
    assert a.version == "000001"  # published after 3 batches; batch 4 is lost with the kill
    del a

    registry = CollectorRegistry()
    b = service(tmp_path / "run", registry=registry)
    assert b.version == "000001" and b.trainer.rows_trained == 3 * N
    assert b.status()["watermarks"] == {"clicks:0": {"offset": 3 * N - 1, "sub": 1}}
    for p in PAYLOADS[2:]:  # the consumer replays from an older position
        b.process(p)
    assert b.trainer.rows_trained == 5 * N
    assert b.trainer.rows_dropped["duplicate"] == N
    assert sample(registry, "headwater_learner_rows_dropped_total", reason="duplicate") == N
    assert b.trainer.metrics.rows == 5 * N
    ref_w = reference.trainer.learner.model.state_dict()
    for k, v in b.trainer.learner.model.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, ref_w[k], msg=k)


def test_publication_through_service(tmp_path):
    seen = []
    registry = CollectorRegistry()
    svc = service(tmp_path, publish_every_rows=N, on_publish=seen.append, registry=registry)
    assert svc.maybe_publish() is None  # nothing processed yet
    svc.process(PAYLOADS[0], backlog=7)
    manifest = svc.maybe_publish()
    assert manifest is not None and seen == [manifest]
    assert svc.maybe_publish() is None  # no new rows since
    pt = tmp_path / "ranker" / manifest["version"] / "model.pt"
    assert manifest["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    assert manifest["feature_schema_hash"] == SCHEMA_HASH
    assert manifest["rows_trained"] == N and manifest["parent"] is None
    assert manifest["watermarks"] == {"clicks:0": {"offset": N - 1, "sub": 1}}
    assert manifest["config"]["model"]["categorical"] == ["user", "item", "ctx"]
    assert 0.0 <= manifest["metrics"]["auc"] <= 1.0
    assert sample(registry, "headwater_learner_rows_trained_total") == N
    assert sample(registry, "headwater_learner_publications_total") == 1
    assert sample(registry, "headwater_learner_backlog_rows") == 7
    assert sample(registry, "headwater_model_version", model="ranker") == 1
    assert sample(registry, "headwater_learner_publish_seconds_count") == 1
    svc.process(PAYLOADS[1])
    assert svc.maybe_publish(force=True)["parent"] == manifest["version"]

    # serving's path: rebuild from the manifest config, weights_only, same scores
    model, m2 = LocalModelStore(tmp_path, "ranker").load_model(expected_schema_hash=SCHEMA_HASH)
    batch = decode_batch(PAYLOADS[2])
    with torch.no_grad():
        served = torch.sigmoid(model.logits(batch.categorical, batch.dense)).numpy()
    np.testing.assert_allclose(served, svc.trainer.learner.predict_proba_many(batch), rtol=1e-5)


def test_time_based_publication_uses_the_clock(tmp_path):
    now = [0.0]
    svc = service(tmp_path, publish_every_seconds=5.0, clock=lambda: now[0])
    svc.process(PAYLOADS[0])
    assert svc.maybe_publish() is None
    now[0] = 5.0
    assert svc.maybe_publish()["version"] == "000001"


def test_bad_payload_and_schema_change_are_counted_not_fatal(tmp_path):
    registry = CollectorRegistry()
    svc = service(tmp_path, registry=registry)
    assert svc.process(b"garbage") is None
    assert "invalid train batch" in svc.status()["last_error"]
    svc.process(PAYLOADS[0])
    other = SCHEMA_JSON.replace('"version":1', '"version":2')
    assert svc.process(make_payload(8, offset=10_000, schema_json=other)) is None
    assert sample(registry, "headwater_learner_rows_dropped_total", reason="schema") == 8
    assert sample(registry, "headwater_learner_rows_dropped_total", reason="invalid_batch") == 1
    status = svc.status()
    assert status["rows_trained"] == N and "schema" in status["last_error"]
    assert set(status) >= {
        "version",
        "rows_trained",
        "auc",
        "logloss",
        "backlog",
        "last_error",
        "uptime",
    }


def test_on_publish_failure_is_reported(tmp_path):
    def boom(_):
        raise RuntimeError("broker down")

    svc = service(tmp_path, publish_every_rows=1, on_publish=boom)
    svc.process(PAYLOADS[0])
    assert svc.maybe_publish()["version"] == "000001"
    assert "broker down" in svc.status()["last_error"]


async def test_async_wrapper_runs_off_loop(tmp_path):
    svc = service(tmp_path)
    res = await svc.aprocess(PAYLOADS[0])
    assert res.rows_trained == N
