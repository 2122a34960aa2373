"""The served forward traced once per architecture (serving/traced.py): bit for bit the
eager forward, for every ranker kind, any batch size and any weights of the
architecture; a version whose traced forward differs serves eagerly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from learner.models import build_model
from learner.store import compute_delta
from serving.loader import ModelLoader
from serving.traced import TracedForwards
from tests.serving.test_ranker_contract import DENSE, batch, served


def _other_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same architecture with every parameter and buffer moved."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*other.parameters(), *other.buffers()]:
            if t.is_floating_point():
                t.add_(torch.rand(t.shape, generator=g, dtype=t.dtype) * 0.1)
    return other


@pytest.mark.parametrize("kind", ["lr", "deepfm", "ipnn", "fgcnn", "fgcnn-dynamic"])
def test_the_traced_forward_scores_bit_for_bit_as_the_eager_one(kind):
    model = (served("fgcnn", embedding="dynamic") if kind == "fgcnn-dynamic" else served(kind)).model
    traced = TracedForwards()
    others = [model, _other_weights(model, 1), _other_weights(model, 2)]
    forwards = [traced.forward_for(m, *m.inputs(*batch(8, 0))) for m in others]
    assert traced.traced == 1 and all(f is not None for f in forwards)  # one graph for all
    for m, forward in zip(others, forwards, strict=True):
        for n in (1, 2, 7, 300):
            cat, dense = batch(n, n)
            with torch.inference_mode():
                want = m.logits(cat, dense)
                got = forward(*m.inputs(cat, dense))
            assert torch.equal(got, want), (kind, n)
    # the weights are inputs of the graph, not constants: other weights, other logits
    cat, dense = batch(5, 9)
    with torch.inference_mode():
        assert not torch.equal(forwards[0](*model.inputs(cat, dense)),
                               forwards[1](*others[1].inputs(cat, dense)))


def test_what_is_not_traced_runs_eagerly():
    model = served("deepfm").model
    rows = model.inputs(*batch(4, 0))
    assert TracedForwards(enabled=False).forward_for(model, *rows) is None
    training = copy.deepcopy(model).train()
    assert TracedForwards().forward_for(training, *rows) is None
    other = build_model({**model.spec.to_dict(), "dense": [*DENSE, "z"]})
    traced = TracedForwards()
    traced.forward_for(model, *rows)
    traced.forward_for(other.eval(), *other.inputs(batch(4, 0)[0], np.zeros((4, 3), np.float32)))
    assert traced.traced == 2  # another architecture: its own graph


def _publish(store, schema, model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    version = store.publish({"model": state}, config={"model": model.spec.to_dict()},
                            feature_schema_json=schema.to_json(), feature_schema_hash=schema.hash,
                            rows_trained=1, watermarks={}, metrics={})["version"]
    return version, state


def test_a_full_checkpoint_and_its_patched_deltas_serve_traced_on_one_graph(store, builder):
    from tests.serving.conftest import _spec

    schema = builder.schema
    torch.manual_seed(0)
    model = build_model(_spec(schema, "deepfm")).eval()
    full, base_state = _publish(store, schema, model)
    loader = ModelLoader(store, schema, traced=TracedForwards())
    base = loader.load(full)
    assert base.forward is not None
    versions = []
    for step in range(3):
        with torch.no_grad():
            model.embedding.table.weight[3 + step] += 0.25
            for p in model.head.parameters():
                p.mul_(0.9)
        model.embedding.mark_dirty([3 + step])
        v = store.publish_delta(compute_delta(base_state, model.state_dict()), base=full,
                                rows_trained=2, watermarks={}, metrics={})["version"]
        versions.append(loader.load(v, base_of=lambda _: base))
    assert all(v.patched and v.forward is not None for v in versions)
    assert loader.traced.traced == 1 and loader.traced.mismatches == 0
    # the newest delta, traced, scores exactly as a full checkpoint of the same state, eager
    rng = np.random.default_rng(3)
    cat = rng.integers(1, 2**62, size=(50, len(schema.categorical)), dtype=np.int64)
    dense = rng.uniform(0, 5, size=(50, len(schema.dense))).astype(np.float32)
    eager = ModelLoader(store, schema).load(_publish(store, schema, model)[0])
    assert eager.forward is None
    assert np.array_equal(versions[-1].predict(cat, dense), eager.predict(cat, dense))


def test_a_traced_forward_that_differs_on_the_warm_up_batch_is_not_served(store, builder,
                                                                          monkeypatch):
    from tests.serving.conftest import _spec

    schema = builder.schema
    torch.manual_seed(0)
    version, _ = _publish(store, schema, build_model(_spec(schema, "deepfm")).eval())
    traced = TracedForwards()
    real = traced.forward_for

    def off_by_a_bit(model, rows, dense):
        forward = real(model, rows, dense)
        return lambda r, d: forward(r, d) + 1e-6

    monkeypatch.setattr(traced, "forward_for", off_by_a_bit)
    got = ModelLoader(store, schema, traced=traced).load(version)
    assert got.forward is None and traced.mismatches == 1
    assert traced.stats(got)["serving_traced"] is False


def test_the_graph_does_not_keep_the_traced_version_alive():
    """The cache keeps graphs, not the weights of the version each was traced with (a
    large embedding table would otherwise stay in memory for the process's life)."""
    import gc
    import weakref

    model = served("deepfm").model
    traced = TracedForwards()
    forward = traced.forward_for(model, *model.inputs(*batch(4, 0)))
    assert forward is not None
    table = weakref.ref(model.embedding.table.weight)
    del model, forward
    gc.collect()
    assert table() is None and traced.stats()["graphs"] == 1
