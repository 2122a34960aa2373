"""The directory layout of the local store; its promises: test_store_contract.py."""

import hashlib
import json

import torch

from learner.store import LocalModelStore


def publish(store, rows=1, schema_hash="h" * 64, value=1.0):
    return store.publish(
        {"w": torch.full((3,), value), "meta": {"n": rows}},
        config={"kind": "lr"},
        feature_schema_json='{"categorical":["a"],"dense":[],"version":1}',
        feature_schema_hash=schema_hash,
        rows_trained=rows,
        watermarks={"clicks:0": {"offset": rows, "sub": 0}},
        metrics={"auc": 0.7, "nan": float("nan")},
    )


def test_publication_format(tmp_path):
    store = LocalModelStore(tmp_path, "ranker")
    m = publish(store, rows=42)
    vdir = tmp_path / "ranker" / "000001"
    on_disk = json.loads((vdir / "manifest.json").read_text())
    assert set(on_disk) == {
        "model",
        "version",
        "created_at",
        "feature_schema_hash",
        "feature_schema",
        "sha256",
        "bytes",
        "rows_trained",
        "watermarks",
        "metrics",
        "config",
        "parent",
    }
    assert on_disk["sha256"] == hashlib.sha256((vdir / "model.pt").read_bytes()).hexdigest()
    assert on_disk["bytes"] == (vdir / "model.pt").stat().st_size
    assert on_disk["rows_trained"] == 42 and on_disk["metrics"]["nan"] is None
    assert on_disk["feature_schema"] == {"categorical": ["a"], "dense": [], "version": 1}
    assert m["path"] == str(vdir) and m["version"] == "000001"
    assert publish(store)["version"] == "000002"
    assert not list((tmp_path / "ranker").glob(".tmp-*"))
