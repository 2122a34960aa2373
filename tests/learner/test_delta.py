"""Delta publications: computing and applying deltas, and the learner publishing them.

A delta (``learner.store.compute_delta``) is what changed since the base full
checkpoint; applied to the base it must give the new weights bit for bit, and the
model rebuilt from base + delta must score exactly like a full checkpoint of the same
state. Trained for real (``TorchLearner`` on synthetic batches, FGCNN head with packed
embedding tables).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from learner.models import build_model
from learner.service import LearnerService
from learner.store import (
    CheckpointError,
    LocalModelStore,
    apply_delta,
    checkpoint_weights,
    compute_delta,
    patch_model,
)
from learner.trainer import TrainerSettings
from tests.learner.synth import TINY_HEAD, make_payload

SETTINGS = TrainerSettings(head=TINY_HEAD, embedding={"buckets": 64}, lr=1e-2, item_field="item")
N = 48
PAYLOADS = [make_payload(N, offset=i * N, seed=i) for i in range(4)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def service(store, clock, **kw) -> LearnerService:
    return LearnerService(store, SETTINGS.factory(), publish_every_seconds=None,
                          registry=CollectorRegistry(), clock=clock, **kw)


def same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_base_plus_deltas_equals_a_full_checkpoint_of_the_same_state(tmp_path):
    store = LocalModelStore(tmp_path, "ranker", keep=2)
    clock = Clock()
    svc = service(store, clock, delta_every_seconds=1.0)
    svc.process(PAYLOADS[0])
    assert svc.maybe_publish() is None  # no base yet: nothing is due
    base = svc.publish()
    assert "kind" not in base or base["kind"] == "full"
    svc.process(PAYLOADS[1])
    assert svc.maybe_publish() is None  # the delta period has not run out
    clock.now += 1.0
    d1 = svc.maybe_publish()
    assert d1["kind"] == "delta" and d1["base"] == base["version"]
    assert d1["base_sha256"] == base["sha256"] and d1["bytes"] < base["bytes"] / 2
    svc.process(PAYLOADS[2])
    clock.now += 1.0
    d2 = svc.maybe_publish()
    assert d2["base"] == base["version"]  # cumulative against the base, not chained
    assert svc.maybe_publish() is None and svc.status()["deltas"] == 2
    assembled, manifest = store.load_weights(d2["version"])
    assert manifest["kind"] == "delta"
    m_delta, _ = store.load_model(d2["version"])
    delta2 = store.load(d2["version"]).state["delta"]
    full = svc.publish()  # a full checkpoint of the very state d2 carries
    assert full.get("kind", "full") == "full"
    # retention (keep 2): the older base's first delta goes once a newer full checkpoint
    # exists; its second is one of the newest two versions and stays, with its base
    assert store.versions() == [base["version"], d2["version"], full["version"]]

    same_weights(assembled, checkpoint_weights(store.load(full["version"]).state))
    m_full, _ = store.load_model(full["version"])
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 2**40, size=(64, 3))
    dense = rng.normal(size=(64, 1)).astype(np.float32)
    with torch.inference_mode():
        a, b = m_delta.logits(tokens, dense), m_full.logits(tokens, dense)
    assert torch.equal(a, b)
    m_base, _ = store.load_model(base["version"])
    with torch.inference_mode():
        assert not torch.equal(m_base.logits(tokens, dense), b)  # training moved the model
    # Serving's way: patch the loaded base model (no rebuild); the base stays as it was.
    base_state = m_base.state_dict()
    patched = patch_model(m_base, delta2)
    same_weights(patched.state_dict(), checkpoint_weights(store.load(full["version"]).state))
    same_weights(m_base.state_dict(), base_state)
    with torch.inference_mode():
        assert torch.equal(patched.logits(tokens, dense), b)
    for n, t in [*patched.named_parameters(), *patched.named_buffers()]:  # copy on write only
        old = m_base.get_parameter(n) if n in dict(m_base.named_parameters()) else m_base.get_buffer(n)
        assert (t is old) == torch.equal(t, old), n
    assert any(b is m_base.get_buffer(n) for n, b in patched.named_buffers())

    # A restart resumes from the newest full checkpoint, never from a delta.
    svc.process(PAYLOADS[3])
    clock.now += 1.0
    d3 = svc.maybe_publish()
    assert d3["kind"] == "delta" and store.latest() == d3["version"]
    assert store.latest_good() == full["version"]
    again = service(store, clock, delta_every_seconds=1.0)
    assert again.version == full["version"] and again.trainer.rows_trained == 3 * N


def test_deltas_off_publishes_only_full_checkpoints(tmp_path):
    store = LocalModelStore(tmp_path, "ranker")
    clock = Clock()
    svc = service(store, clock)
    svc.process(PAYLOADS[0])
    svc.publish()
    svc.process(PAYLOADS[1])
    clock.now += 10
    assert svc.maybe_publish() is None and store.versions() == ["000001"]


def table_weights(seed: int, dirty: list[int]) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.table.packed_rows": torch.tensor(dirty, dtype=torch.int64),
        "emb.table.packed_values": torch.randn(len(dirty), 3, generator=g),
        "emb.table.init": torch.tensor([7, 100, 3]),
        "wide": torch.randn(50, 2, generator=g),
        "mlp.weight": torch.randn(4, 3, generator=g),
        "mlp.bias": torch.randn(4, generator=g),
        "emb._extra_state": {"slots": torch.arange(3), "admitted": 3},
    }


def test_delta_lists_only_what_changed_and_applies_exactly():
    base = table_weights(0, [2, 5, 9, 40])
    new = {k: v.clone() if torch.is_tensor(v) else v for k, v in base.items()}
    # trained rows 5 (changed) and 41 (new), row 40 no longer trained, 2 and 9 unchanged
    new["emb.table.packed_rows"] = torch.tensor([2, 5, 9, 41])
    new["emb.table.packed_values"] = torch.cat(
        [base["emb.table.packed_values"][:3], torch.ones(1, 3)])
    new["emb.table.packed_values"][1, 0] = float("nan")
    new["wide"][7] += 1.0
    new["mlp.bias"] += 0.5
    new["emb._extra_state"] = {"slots": torch.arange(4), "admitted": 4}
    d = compute_delta(base, new)
    assert d["packed"]["emb.table"]["ids"].tolist() == [5, 41]
    assert d["packed"]["emb.table"]["dropped"].tolist() == [40]
    assert d["rows"]["wide"]["index"].tolist() == [7]
    assert d["rows"]["mlp.weight"]["index"].tolist() == []  # a table nothing changed in
    assert sorted(d["dense"]) == ["emb._extra_state", "emb.table.init", "mlp.bias"]
    out = apply_delta(base, d)
    assert set(out) == set(new)
    assert out.pop("emb._extra_state")["admitted"] == new.pop("emb._extra_state")["admitted"]
    for k in new:
        assert torch.equal(out[k], new[k]) or (
            torch.isnan(new[k]).any() and torch.allclose(out[k], new[k], equal_nan=True)), k
    assert torch.equal(base["wide"], table_weights(0, [2, 5, 9, 40])["wide"])  # base untouched
    assert apply_delta(base, compute_delta(base, base))["wide"] is base["wide"]  # shared, no copy


def test_a_delta_that_does_not_fit_its_base_is_refused():
    base = table_weights(0, [1, 2])
    d = compute_delta(base, table_weights(1, [1, 2, 3]))
    other = dict(base)
    other.pop("mlp.bias")
    with pytest.raises(ValueError, match="does not cover exactly"):
        apply_delta(other, d)
    with pytest.raises(ValueError, match="does not fit"):
        apply_delta({**base, "mlp.weight": torch.zeros(5, 3)}, d)
    bad = compute_delta(base, table_weights(0, [1, 2]) | {"wide": base["wide"] + 1})
    with pytest.raises(ValueError, match="changed its type or shape"):
        compute_delta(base, {**base, "mlp.bias": torch.zeros(5)})
    bad["dense"].pop("wide", None)
    bad["rows"]["wide"] = {"index": torch.tensor([99]), "values": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="do not fit"):
        apply_delta(base, bad)


def test_patch_model_leaves_to_a_rebuild_what_it_does_not_cover():
    spec = {"kind": "deepfm", "categorical": ["u"], "embedding": {"dim": 2, "buckets": 8}}
    base = build_model(spec).eval()
    base.embedding.mark_dirty([1, 3])
    new = build_model(spec).eval()
    new.load_state_dict(base.state_dict())
    new.embedding.dirty[3] = False  # row 3 back to its initial draw: "dropped"
    with torch.no_grad():
        new.embedding.table.weight[5] += 1.0
    new.embedding.mark_dirty([5])
    d = compute_delta(base.state_dict(), new.state_dict())
    assert d["packed"]["embedding.table"]["dropped"].tolist() == [3]
    assert patch_model(base, d) is None  # the caller rebuilds
    d["packed"]["embedding.table"]["dropped"] = torch.zeros(0, dtype=torch.int64)
    patched = patch_model(base, d)
    assert torch.equal(patched.embedding.table.weight[5], new.embedding.table.weight[5])
    assert patched.embedding.dirty.nonzero()[0].tolist() == [1, 3, 5]
    d["packed"]["embedding.table"]["ids"] = torch.tensor([99])
    with pytest.raises(ValueError, match="do not fit"):
        patch_model(base, d)
    d.pop("dense")
    with pytest.raises(ValueError, match="dense"):
        patch_model(base, d)


def test_with_deltas_on_what_waits_is_trained_before_each_delta(tmp_path):
    clock = Clock()
    svc = service(LocalModelStore(tmp_path, "ranker"), clock, step_rows=10_000,
                  step_wait_seconds=2.0, delta_every_seconds=0.5)
    off = service(LocalModelStore(tmp_path / "off", "ranker"), clock, step_rows=10_000,
                  step_wait_seconds=2.0)
    for s in (svc, off):
        s.process(PAYLOADS[0])
    assert svc.tick() is None and off.tick() is None
    clock.now += 2.0  # no full checkpoint yet: the step wait decides
    assert svc.tick() is not None and off.tick() is not None
    for s in (svc, off):
        s.publish()
        s.process(PAYLOADS[1])
        assert s.pending_rows == N and s.tick() is None  # the step is not full yet
    clock.now += 0.5
    assert svc.tick() is not None and svc.pending_rows == 0  # trained as the delta is due
    d = svc.maybe_publish()
    assert d["kind"] == "delta" and d["rows_trained"] == 2 * N  # the delta carries the rows
    assert off.tick() is None and off.pending_rows == N  # deltas off: the 2 s wait holds
    clock.now += 1.5
    assert off.tick() is not None


def test_a_delta_never_names_a_base_it_was_not_computed_from(tmp_path):
    """The store's base version was replaced under a learner (store wiped, another learner
    published under the same number): its next delta is not published on that base (a
    full checkpoint goes out instead, the next deltas' base); the store refuses a delta
    whose publisher's base sha256 is not the store's."""
    store = LocalModelStore(tmp_path, "ranker")
    clock = Clock()
    svc = service(store, clock, delta_every_seconds=1.0)
    svc.process(PAYLOADS[0])
    mine = svc.publish()
    store.clear()  # wiped; another learner trains on other rows and publishes 000001
    other = service(store, clock, resume=False)
    other.process(PAYLOADS[2])
    theirs = other.publish()
    assert theirs["version"] == mine["version"] and theirs["sha256"] != mine["sha256"]
    with pytest.raises(CheckpointError, match="not the checkpoint the delta was computed against"):
        store.publish_delta({}, base=theirs["version"], base_sha256=mine["sha256"],
                            rows_trained=0, watermarks={}, metrics={})
    svc.process(PAYLOADS[1])
    clock.now += 1.0
    out = svc.maybe_publish()
    assert out.get("kind", "full") == "full" and out["version"] == "000002"
    assert svc.deltas == 0 and svc.deltas_refused == 1 and "full checkpoint instead" in svc.last_error
    assert store.versions() == ["000001", "000002"]
    svc.process(PAYLOADS[3])
    clock.now += 1.0
    d = svc.maybe_publish()  # deltas resume on the learner's own new full checkpoint
    assert (d["kind"], d["base"], d["base_sha256"]) == ("delta", out["version"], out["sha256"])


def test_deltas_keep_their_cadence_when_a_step_makes_one_late(tmp_path):
    """A delta published late (its step and write took time) does not push the next one
    back: they stay one period apart on average; more than a period late restarts."""
    clock = Clock()
    svc = service(LocalModelStore(tmp_path, "ranker"), clock, delta_every_seconds=1.0)
    svc.process(PAYLOADS[0])
    svc.publish()  # at 0.0
    svc.process(PAYLOADS[1])
    clock.now = 1.3  # due at 1.0, published at 1.3
    assert svc.maybe_publish()["kind"] == "delta"
    svc.process(PAYLOADS[2])
    clock.now = 1.99
    assert svc.maybe_publish() is None
    clock.now = 2.0  # due at 2.0, not 2.3
    assert svc.maybe_publish()["kind"] == "delta"
    svc.process(PAYLOADS[3])
    clock.now = 4.5  # 1.5 s late: the cadence restarts from here
    assert svc.maybe_publish()["kind"] == "delta"
    svc.process(make_payload(N, offset=4 * N, seed=4))
    clock.now = 5.4
    assert svc.maybe_publish() is None
    clock.now = 5.5
    assert svc.maybe_publish()["kind"] == "delta"
