"""One contract for what serving scores with (serving/ranker.py), River-style: the
item-CTR baseline and a served model of every ranker kind, rebuilt from its checkpoint
the one way serving does (``learner.store.rebuild_model``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from learner.embeddings import EmbeddingConfig
from learner.models import ModelSpec, build_model, preset_head
from learner.protocol import Rows, TorchLearner
from learner.store import rebuild_model
from serving.models import BaselineModel, ServedModel
from serving.ranker import Ranker

FIELDS = ["user", "item", "ctx"]
DENSE = ["x", "item_ctr_total"]


def batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cat = rng.integers(1, 60, (n, len(FIELDS))).astype(np.int64)
    dense = np.stack([rng.normal(size=n), rng.random(n)], axis=1).astype(np.float32)
    return cat, dense


def served(kind: str, embedding: str = "hashed") -> ServedModel:
    torch.manual_seed(0)
    emb = EmbeddingConfig(kind=embedding, buckets=256, capacity=256, init_seed=0)
    spec = ModelSpec(kind, FIELDS, DENSE, preset_head(kind, "stream"), emb.to_dict(),
                     dense_norm=True, wide=True)
    learner = TorchLearner(build_model(spec), lr=0.01, embedding_lr=0.05)
    cat, dense = batch(256, 1)
    labels = (dense[:, 1] > 0.5).astype(np.int8)
    learner.learn_many(Rows(cat, dense, labels, ts=1e9 + np.arange(256, dtype=np.float64)))
    model = rebuild_model({"model": spec.to_dict()}, copy.deepcopy(learner.model.state_dict()))
    return ServedModel(f"{kind}-v1", model, {"created_at": 1e9, "model": spec.to_dict()},
                       len(FIELDS), len(DENSE))


def same(a, b) -> bool:
    """Equal values, through the nested dicts a model's extra state may hold."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a) or isinstance(a, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return a == b


RANKERS = {
    "baseline": lambda: BaselineModel.for_schema(DENSE),
    **{kind: (lambda kind=kind: served(kind)) for kind in ("lr", "deepfm", "ipnn", "fgcnn")},
    "fgcnn-dynamic-tables": lambda: served("fgcnn", embedding="dynamic"),
}


@pytest.fixture(scope="module", params=sorted(RANKERS))
def ranker(request) -> Ranker:
    return RANKERS[request.param]()


def test_keeps_the_protocol(ranker):
    assert isinstance(ranker, Ranker)
    assert isinstance(ranker.version, str) and ranker.version


def test_probabilities_are_finite_one_per_row_and_empty_is_empty(ranker):
    cat, dense = batch(50, 2)
    p = ranker.predict(cat, dense)
    assert p.shape == (50,) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert ranker.predict(cat[:0], dense[:0]).shape == (0,)


def test_scoring_is_pure_and_row_independent(ranker):
    cat, dense = batch(20, 3)
    state = copy.deepcopy(ranker.model.state_dict()) if isinstance(ranker, ServedModel) else None
    first = ranker.predict(cat, dense)
    np.testing.assert_array_equal(ranker.predict(cat, dense), first)
    alone = np.array([ranker.predict(cat[i:i + 1], dense[i:i + 1])[0] for i in range(20)])
    np.testing.assert_allclose(alone, first, rtol=1e-5, atol=1e-6)
    if state is not None:
        for name, value in ranker.model.state_dict().items():
            assert same(value, state[name]), name


def test_unseen_and_missing_tokens_score(ranker):
    cat, dense = batch(4, 4)
    cat[0] = 0
    cat[1] = 10 ** 9
    assert np.isfinite(ranker.predict(cat, dense)).all()


def test_the_baseline_ranks_by_the_items_smoothed_ctr():
    baseline = BaselineModel.for_schema(DENSE)
    cat, dense = batch(30, 5)
    np.testing.assert_allclose(baseline.predict(cat, dense), dense[:, 1])
    assert BaselineModel.for_schema(["x"]) is None
