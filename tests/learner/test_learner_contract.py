"""One contract, every learner (River's ``check_estimator`` practice).

Each implementation of :class:`learner.protocol.Learner` the product can run (every
ranker kind, both embedding kinds, with and without the wide part, and the River
adapter the benchmarks use) goes through the same checks:

- probabilities: finite, in [0, 1], one per row, also for an empty batch;
- scoring is pure: it changes no weight and no table state (test-then-train relies on it);
- scoring is row-independent: a row scores the same alone or in a batch (eval mode);
- unseen tokens and the missing token 0 score without error;
- it learns: on a signal carried by one field, held-out AUC rises well above chance;
- torch rankers survive a publication: the model serving rebuilds from the checkpoint
  (``learner.store.rebuild_model``, the one rebuild path) scores exactly like the trained one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from river import linear_model, optim
from sklearn.metrics import roc_auc_score

from learner.embeddings import EmbeddingConfig
from learner.models import ModelSpec, build_model, preset_head
from learner.protocol import Learner, RiverLearner, Rows, TorchLearner
from learner.store import rebuild_model

FIELDS = ["user", "item", "ctx"]
DENSE = ["x", "y"]


def rows(n: int, seed: int) -> Rows:
    """The item's parity and x carry the label; users and ctx are noise."""
    rng = np.random.default_rng(seed)
    items = rng.integers(1, 41, n)
    cat = np.stack([rng.integers(1, 60, n), items, rng.integers(1, 5, n)], axis=1).astype(np.int64)
    x = rng.normal(size=n)
    dense = np.stack([x, rng.normal(size=n)], axis=1).astype(np.float32)
    logit = np.where(items % 2 == 0, 2.0, -2.0) + 0.5 * x
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return Rows(cat, dense, labels, ts=1e9 + np.arange(n, dtype=np.float64))


def _torch(kind: str, *, preset: str = "stream", wide: bool = True, embedding: str = "hashed",
           lr: float = 0.01) -> Callable[[], TorchLearner]:
    def make() -> TorchLearner:
        torch.manual_seed(0)
        head = preset_head(kind, preset)
        emb = EmbeddingConfig(kind=embedding, buckets=512, capacity=512, init_seed=0)
        spec = ModelSpec(kind, FIELDS, DENSE, head, emb.to_dict(), dense_norm=True, wide=wide)
        return TorchLearner(build_model(spec), lr=lr, embedding_lr=0.05)
    return make


def _river() -> RiverLearner:
    return RiverLearner(linear_model.LogisticRegression(optimizer=optim.AdaGrad(0.1)), FIELDS, DENSE)


LEARNERS: dict[str, Callable[[], Learner]] = {
    "lr": _torch("lr"),
    "deepfm": _torch("deepfm"),
    "ipnn": _torch("ipnn"),
    "fgcnn-stream": _torch("fgcnn"),
    "fgcnn-lean": _torch("fgcnn", preset="lean"),  # the default (core.settings)
    "fgcnn-compact": _torch("fgcnn", preset="compact"),
    "fgcnn-no-wide": _torch("fgcnn", wide=False),
    "fgcnn-dynamic-tables": _torch("fgcnn", embedding="dynamic"),
    "river-lr-adagrad": _river,
}


@pytest.fixture(params=sorted(LEARNERS))
def make(request) -> Callable[[], Learner]:
    return LEARNERS[request.param]


def _fit(learner: Learner, passes: int = 3, n: int = 1500) -> None:
    train = rows(n, seed=1)
    for _ in range(passes):
        for start in range(0, n, 128):
            learner.learn_many(Rows(train.categorical[start:start + 128], train.dense[start:start + 128],
                                    train.labels[start:start + 128], train.ts[start:start + 128]))


def _state(learner: Learner):
    if isinstance(learner, TorchLearner):
        return copy.deepcopy(learner.model.state_dict())
    return copy.deepcopy(learner.model.weights)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_implements_the_protocol(make):
    assert isinstance(make(), Learner)


def test_probabilities_are_finite_one_per_row_and_empty_is_empty(make):
    learner = make()
    batch = rows(64, seed=2)
    for p in (learner.predict_proba_many(batch), (_fit(learner, passes=1), learner.predict_proba_many(batch))[1]):
        assert p.shape == (64,) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    empty = Rows(np.zeros((0, 3), np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.int8))
    assert learner.predict_proba_many(empty).shape == (0,)
    learner.learn_many(empty)  # a no-op, not an error


def test_scoring_is_pure(make):
    learner = make()
    _fit(learner, passes=1)
    before = _state(learner)
    batch = rows(200, seed=3)
    first = learner.predict_proba_many(batch)
    second = learner.predict_proba_many(batch)
    np.testing.assert_array_equal(first, second)
    assert _same(before, _state(learner))


def test_scoring_is_row_independent(make):
    learner = make()
    _fit(learner, passes=1)
    batch = rows(16, seed=4)
    together = learner.predict_proba_many(batch)
    alone = np.concatenate([learner.predict_proba_many(Rows(batch.categorical[i:i + 1], batch.dense[i:i + 1],
                                                             batch.labels[i:i + 1])) for i in range(16)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_unseen_and_missing_tokens_score(make):
    learner = make()
    _fit(learner, passes=1)
    batch = rows(8, seed=5)
    batch.categorical[:4] = 0                      # missing everywhere
    batch.categorical[4:] = np.int64(2**62) + 7    # never seen
    p = learner.predict_proba_many(batch)
    assert np.isfinite(p).all()


def test_it_learns_the_signal(make):
    learner = make()
    test = rows(800, seed=9)
    before = roc_auc_score(test.labels, learner.predict_proba_many(test))
    _fit(learner)
    after = roc_auc_score(test.labels, learner.predict_proba_many(test))
    assert after > 0.80 and after > before + 0.1, (before, after)


@pytest.mark.parametrize("name", [n for n in sorted(LEARNERS) if not n.startswith("river")])
def test_the_served_rebuild_scores_like_the_trained_model(name):
    learner = LEARNERS[name]()
    _fit(learner, passes=1)
    model = learner.serving_model()
    served = rebuild_model({"model": model.spec.to_dict()}, copy.deepcopy(model.state_dict()))
    batch = rows(300, seed=7)
    served.eval()
    with torch.no_grad():
        got = torch.sigmoid(served.logits(batch.categorical, batch.dense)).numpy()
    np.testing.assert_allclose(got, learner.predict_proba_many(batch), rtol=1e-5, atol=1e-6)


def test_the_rebuild_fails_loudly_on_weights_that_do_not_fit():
    learner = LEARNERS["fgcnn-stream"]()
    weights = copy.deepcopy(learner.serving_model().state_dict())
    other = ModelSpec("fgcnn", FIELDS, DENSE, {**preset_head("fgcnn", "stream"), "mlp": [7]},
                      learner.serving_model().spec.embedding, dense_norm=True, wide=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        rebuild_model({"model": other.to_dict()}, weights)
