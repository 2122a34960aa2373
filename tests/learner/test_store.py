import hashlib
import json

import pytest
import torch

from learner.store import CheckpointError, ModelStore


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
    store = ModelStore(tmp_path, "ranker")
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


def test_tampered_checkpoint_is_refused(tmp_path):
    store = ModelStore(tmp_path)
    v = publish(store)["version"]
    pt = tmp_path / "ranker" / v / "model.pt"
    data = bytearray(pt.read_bytes())
    data[-20] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        store.load(v)
    assert store.latest_good() is None


def test_latest_good_skips_a_torn_newest_version(tmp_path):
    store = ModelStore(tmp_path)
    publish(store, value=1.0)
    v2 = publish(store, value=2.0)["version"]
    (tmp_path / "ranker" / v2 / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="model.pt is missing"):
        store.verify(v2)
    assert store.latest_good() == "000001"
    assert store.load().state["w"].tolist() == [1.0] * 3


def test_schema_hash_mismatch_is_refused(tmp_path):
    store = ModelStore(tmp_path)
    v = publish(store, schema_hash="a" * 64)["version"]
    with pytest.raises(CheckpointError, match="feature schema hash"):
        store.load(v, expected_schema_hash="b" * 64)
    assert store.load(v, expected_schema_hash="a" * 64).manifest["version"] == v


def test_load_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    store = ModelStore(tmp_path)
    v = publish(store)["version"]
    pt = tmp_path / "ranker" / v / "model.pt"
    torch.save({"x": Evil()}, pt)
    manifest_path = tmp_path / "ranker" / v / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = hashlib.sha256(pt.read_bytes()).hexdigest()  # a consistent forgery
    manifest["bytes"] = pt.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not loadable"):
        store.load(v)


def test_missing_manifest_is_named(tmp_path):
    store = ModelStore(tmp_path)
    v = publish(store)["version"]
    (tmp_path / "ranker" / v / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        store.load(v)


def test_retention_keeps_last_k_and_pinned(tmp_path):
    store = ModelStore(tmp_path, keep=2)
    publish(store)
    store.pin("000001")
    for _ in range(4):
        publish(store)
    assert store.versions() == ["000001", "000004", "000005"]
    assert store.pins() == ["000001"]
    store.unpin("000001")
    publish(store)
    assert store.versions() == ["000005", "000006"]
    with pytest.raises(CheckpointError, match="unknown version"):
        store.pin("000001")
    assert [e["version"] for e in store.list()] == ["000005", "000006"]
