"""One contract suite for every :class:`learner.store.ModelStore` implementation.

Each test runs against the local directory store and the object store (S3 protocol over
real HTTP, moto's server: ``tests/conftest.py``). What a store promises is written in
:class:`learner.store.ModelStore`; tampering goes around the store (``Raw``) the way a
torn write, a bit flip or a hostile file would.
"""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import torch

from core.settings import Settings
from learner.model_stores import open_model_store
from learner.store import CheckpointError, LocalModelStore, ModelStore, compute_delta

SCHEMA = '{"categorical":["a"],"dense":[],"version":1}'


class Raw:
    """Byte-level access to a store's objects, behind the store's back."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def _weights_name(self, version: str) -> str:
        return self.store.manifest(version).get("file", "model.pt")

    def put(self, version: str, leaf: str, data: bytes) -> None:
        if isinstance(self.store, LocalModelStore):
            path = self.store.dir / version / leaf
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self.store.client.put_object(Bucket=self.store.bucket,
                                         Key=f"{self.store.base}/{version}/{leaf}", Body=data)

    def get(self, version: str, leaf: str) -> bytes:
        if isinstance(self.store, LocalModelStore):
            return (self.store.dir / version / leaf).read_bytes()
        return self.store.client.get_object(
            Bucket=self.store.bucket, Key=f"{self.store.base}/{version}/{leaf}")["Body"].read()

    def delete(self, version: str, leaf: str) -> None:
        if isinstance(self.store, LocalModelStore):
            (self.store.dir / version / leaf).unlink()
        else:
            self.store.client.delete_object(Bucket=self.store.bucket,
                                            Key=f"{self.store.base}/{version}/{leaf}")

    def flip_weights_byte(self, version: str) -> None:
        name = self._weights_name(version)
        data = bytearray(self.get(version, name))
        data[len(data) // 2] ^= 0xFF
        self.put(version, name, bytes(data))

    def leftover_of_a_crash(self, version: str) -> None:
        """What a publication killed between its weights and its manifest leaves."""
        if isinstance(self.store, LocalModelStore):
            path = self.store.dir / f".tmp-{version}-crashed" / "model.pt"
            path.parent.mkdir(parents=True)
            path.write_bytes(b"half a checkpoint")
        else:
            self.put(version, "model-crashed.pt", b"half a checkpoint")


@pytest.fixture(params=["local", "s3"])
def settings(request, tmp_path) -> Settings:
    if request.param == "local":
        return Settings(model_store=tmp_path / "models", state_dir=tmp_path / "state")
    return Settings(**request.getfixturevalue("s3_settings"))


@pytest.fixture
def make_store(settings):
    return lambda keep=3: open_model_store(settings, keep=keep)


@pytest.fixture
def store(make_store) -> ModelStore:
    return make_store()


def publish(store: ModelStore, value: float = 1.0, rows: int = 1, schema_hash: str = "h" * 64,
            size: int = 3) -> dict:
    return store.publish(
        {"model": {"w": torch.full((size,), value)}, "meta": {"rows": rows}},
        config={"kind": "lr"}, feature_schema_json=SCHEMA, feature_schema_hash=schema_hash,
        rows_trained=rows, watermarks={"clicks:0": {"offset": rows, "sub": 0}},
        metrics={"auc": 0.7, "nan": float("nan")},
    )


def test_is_a_model_store(store):
    assert isinstance(store, ModelStore)
    assert store.versions() == [] and store.latest() is None and store.latest_good() is None
    with pytest.raises(CheckpointError, match="no loadable version"):
        store.load()


def test_publish_list_latest_load(store):
    m1 = publish(store, 1.0, rows=10)
    m2 = publish(store, 2.0, rows=20)
    assert (m1["version"], m2["version"]) == ("000001", "000002")
    assert m2["parent"] is None and m2["path"].endswith("/000002")
    assert store.versions() == ["000001", "000002"] and store.latest() == "000002"
    assert store.exists("000001") and not store.exists("000003") and not store.exists("../x")
    manifest = store.manifest("000001")
    assert manifest["rows_trained"] == 10 and manifest["metrics"] == {"auc": 0.7, "nan": None}
    assert manifest["feature_schema"] == json.loads(SCHEMA)
    assert [(e["version"], e["rows_trained"], e["error"]) for e in store.list()] == [
        ("000001", 10, None), ("000002", 20, None)]
    assert store.load().state["model"]["w"].tolist() == [2.0] * 3  # default: latest good
    ck = store.load("000001", expected_schema_hash="h" * 64)
    assert ck.state["model"]["w"].tolist() == [1.0] * 3 and ck.manifest["version"] == "000001"
    weights = Raw(store).get("000001", manifest.get("file", "model.pt"))
    assert manifest["sha256"] == hashlib.sha256(weights).hexdigest()
    assert manifest["bytes"] == len(weights)


def test_a_new_store_object_sees_everything(store, make_store):
    """A restart (or another process: learner vs serving) reads what was written."""
    publish(store, 1.0)
    store.pin("000001")
    other = make_store()
    assert other.versions() == ["000001"] and other.pins() == ["000001"]
    assert other.load("000001").state["model"]["w"].tolist() == [1.0] * 3


def test_schema_hash_mismatch_is_refused(store):
    v = publish(store, schema_hash="a" * 64)["version"]
    with pytest.raises(CheckpointError, match=f"version {v}: feature schema hash"):
        store.load(v, expected_schema_hash="b" * 64)
    assert store.latest_good("b" * 64) is None
    assert store.latest_good("a" * 64) == v


def test_altered_weights_are_refused_and_skipped(store):
    publish(store, 1.0)
    v2 = publish(store, 2.0)["version"]
    Raw(store).flip_weights_byte(v2)
    with pytest.raises(CheckpointError, match=f"version {v2}: sha256 mismatch"):
        store.load(v2)
    assert store.latest_good() == "000001"
    assert store.load().state["model"]["w"].tolist() == [1.0] * 3


def test_truncated_weights_are_refused(store):
    v = publish(store)["version"]
    raw = Raw(store)
    name = store.manifest(v).get("file", "model.pt")
    raw.put(v, name, raw.get(v, name)[:-7])
    with pytest.raises(CheckpointError, match="bytes, manifest says"):
        store.verify(v)


def test_missing_weights_are_named(store):
    publish(store, 1.0)
    v2 = publish(store, 2.0)["version"]
    name = store.manifest(v2).get("file", "model.pt")
    Raw(store).delete(v2, name)
    with pytest.raises(CheckpointError, match=f"version {v2}: {name} is missing"):
        store.verify(v2)
    assert store.latest_good() == "000001"


@pytest.mark.parametrize("damage", ["garbage", "other-version", "missing-keys", "bad-file"])
def test_a_bad_manifest_is_refused_loudly(store, damage):
    v = publish(store)["version"]
    raw = Raw(store)
    manifest = json.loads(raw.get(v, "manifest.json"))
    body = {
        "garbage": b"{not json",
        "other-version": json.dumps({**manifest, "version": "000009"}).encode(),
        "missing-keys": json.dumps({k: manifest[k] for k in ("model", "version")}).encode(),
        "bad-file": json.dumps({**manifest, "file": "../../etc/passwd"}).encode(),
    }[damage]
    raw.put(v, "manifest.json", body)
    with pytest.raises(CheckpointError, match=f"version {v}: manifest.json"):
        store.load(v)
    assert store.latest_good() is None
    assert store.list()[0]["error"].startswith(f"ranker version {v}: manifest.json")


def test_missing_manifest_is_named(store):
    publish(store, 1.0)
    v2 = publish(store, 2.0)["version"]
    Raw(store).delete(v2, "manifest.json")
    with pytest.raises(CheckpointError, match=f"version {v2}: manifest.json is missing"):
        store.load(v2)
    assert store.latest_good() == "000001"


def test_load_is_weights_only(store):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    v = publish(store)["version"]
    raw = Raw(store)
    manifest = store.manifest(v)
    name = manifest.get("file", "model.pt")
    import io

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    evil = buf.getvalue()
    raw.put(v, name, evil)  # a consistent forgery: the manifest agrees with the file
    raw.put(v, "manifest.json", json.dumps(
        {**manifest, "sha256": hashlib.sha256(evil).hexdigest(), "bytes": len(evil)}).encode())
    with pytest.raises(CheckpointError, match="not loadable"):
        store.load(v)


def test_pins_and_retention(make_store):
    store = make_store(keep=2)
    publish(store)
    store.pin("000001")
    for _ in range(4):
        publish(store)
    assert store.versions() == ["000001", "000004", "000005"]
    assert store.pins() == ["000001"]
    assert [e["pinned"] for e in store.list()] == [True, False, False]
    store.unpin("000001")
    publish(store)
    assert store.versions() == ["000005", "000006"]
    with pytest.raises(CheckpointError, match="unknown version"):
        store.pin("000001")
    assert store.pins() == []


def test_retention_never_deletes_the_newest_even_with_pins(make_store):
    store = make_store(keep=1)
    publish(store)
    store.pin("000001")
    publish(store)
    publish(store)
    assert store.versions() == ["000001", "000003"]
    store.unpin("000001")
    assert store.prune() == ["000001"] and store.versions() == ["000003"]


def publish_delta(store: ModelStore, base: str, value: float) -> dict:
    delta = compute_delta(store.load(base).state["model"], {"w": torch.full((3,), value)})
    return store.publish_delta(delta, base=base, rows_trained=2, watermarks={},
                               metrics={"auc": 0.8})


def test_a_delta_assembles_on_its_base_and_is_never_resumed_from(store):
    base = publish(store, 1.0)
    d = publish_delta(store, base["version"], 2.0)
    assert (d["kind"], d["base"], d["base_sha256"]) == ("delta", "000001", base["sha256"])
    assert d["config"] == base["config"] and d["feature_schema_hash"] == base["feature_schema_hash"]
    weights, manifest = store.load_weights(d["version"], expected_schema_hash="h" * 64)
    assert weights["w"].tolist() == [2.0] * 3 and manifest["version"] == "000002"
    assert make_kind(store) == [("000001", "full", None), ("000002", "delta", "000001")]
    assert store.latest() == "000002" and store.latest_good() == "000001"
    assert store.load().manifest["version"] == "000001"  # default load: a full checkpoint
    with pytest.raises(CheckpointError, match="unknown base"):
        store.publish_delta({}, base="000009", rows_trained=0, watermarks={}, metrics={})
    with pytest.raises(CheckpointError, match="must be a full checkpoint"):
        store.publish_delta({}, base="000002", rows_trained=0, watermarks={}, metrics={})


def make_kind(store: ModelStore) -> list[tuple]:
    return [(e["version"], e["kind"], e["base"]) for e in store.list()]


def test_a_delta_on_another_base_is_refused(store):
    publish(store, 1.0)
    d = publish_delta(store, "000001", 2.0)["version"]
    manifest = store.manifest(d)
    Raw(store).put(d, "manifest.json", json.dumps({**manifest, "base_sha256": "0" * 64}).encode())
    with pytest.raises(CheckpointError, match="delta on another base"):
        store.load_weights(d)


def test_retention_keeps_the_newest_versions_of_any_kind_with_their_bases(make_store):
    store = make_store(keep=2)
    publish(store)
    publish_delta(store, "000001", 2.0)
    publish(store)  # 000003: the delta of 000001 is one of the newest two, so it stays
    assert store.versions() == ["000001", "000002", "000003"]
    publish_delta(store, "000003", 2.0)  # 000004: 000002 is neither newest nor on the newest full
    assert store.versions() == ["000001", "000003", "000004"]
    store.pin("000004")
    publish_delta(store, "000003", 3.0)
    publish(store)  # 000006
    publish_delta(store, "000006", 2.0)
    # full: newest 2; newest 2 of any kind; deltas of the newest full; a pinned delta and its base
    assert store.versions() == ["000003", "000004", "000006", "000007"]
    publish(store)  # 000008: 000007 is one of the newest two (with its base 000006)
    assert store.versions() == ["000003", "000004", "000006", "000007", "000008"]
    store.unpin("000004")
    assert store.prune() == ["000003", "000004"]
    assert store.load_weights("000007")[0]["w"].tolist() == [2.0] * 3
    publish(store)  # 000009: 000007 is superseded twice over and goes
    assert store.versions() == ["000008", "000009"]


def test_unreadable_pins_are_named(store):
    publish(store)
    store.pin("000001")
    if isinstance(store, LocalModelStore):
        (store.dir / "pins.json").write_bytes(b"[oops")
    else:
        store.client.put_object(Bucket=store.bucket, Key=f"{store.base}/pins.json", Body=b"[oops")
    with pytest.raises(CheckpointError, match="pins.json unreadable"):
        store.pins()


def test_an_interrupted_publication_is_invisible(store):
    publish(store, 1.0)
    Raw(store).leftover_of_a_crash("000002")
    assert store.versions() == ["000001"] and not store.exists("000002")
    assert publish(store, 2.0)["version"] == "000002"  # and it does not block the next one
    assert store.load("000002").state["model"]["w"].tolist() == [2.0] * 3


def test_two_writers_cannot_both_take_a_version(store, make_store, monkeypatch):
    publish(store, 1.0)
    late = make_store()
    monkeypatch.setattr(late, "latest", lambda: None)  # it has not seen 000001 yet
    with pytest.raises((CheckpointError, OSError)):
        publish(late, 9.0)
    assert store.versions() == ["000001"]
    assert store.load("000001").state["model"]["w"].tolist() == [1.0] * 3


def test_readers_never_see_a_partial_version(store):
    """Publications of ~1 MB checkpoints while a reader loads whatever is newest."""
    stop = threading.Event()
    errors: list[str] = []
    loads = []

    def read() -> None:
        while not stop.is_set():
            v = store.latest()
            if v is None:
                continue
            try:
                ck = store.load(v)
            except CheckpointError as exc:
                if store.exists(v):  # a pruned version may vanish mid-load; nothing else may fail
                    errors.append(str(exc))
                continue
            loads.append(v)
            w = ck.state["model"]["w"]
            if not bool((w == w[0]).all()) or float(w[0]) != int(v):
                errors.append(f"{v}: wrong contents")

    t = threading.Thread(target=read)
    t.start()
    try:
        for i in range(1, 9):
            publish(store, float(i), size=1 << 18)
    finally:
        stop.set()
        t.join(30)
    assert errors == []
    assert loads, "the reader never loaded a version"


def test_clear_removes_every_version_and_pin(store, make_store):
    publish(store)
    publish(store)
    store.pin("000001")
    store.clear()
    fresh = make_store()
    assert fresh.versions() == [] and fresh.pins() == []
    assert publish(fresh)["version"] == "000001"


def test_up_reads_the_stores_watermarks_and_reset_clears_it(store, settings):
    """``headwater up`` checks the newest version's watermarks; ``reset`` wipes the store."""
    from headwater.lifetimes import purge, recorded_in_model_store

    publish(store, rows=5)
    assert recorded_in_model_store(settings) == ("000001", {("clicks", 0): 5})
    purge(settings, echo=lambda _: None)
    assert recorded_in_model_store(settings) == (None, {})
    assert open_model_store(settings).versions() == []


# ---- what only the object store has: an endpoint that can be away ---------------------
def test_an_unreachable_endpoint_is_unavailable_not_corrupt(s3_settings):
    from headwater.servers import free_port
    from learner.store import StoreUnavailable

    settings = Settings(**{**s3_settings, "model_store_endpoint": f"http://127.0.0.1:{free_port()}"})
    store = open_model_store(settings)
    with pytest.raises(StoreUnavailable, match="list_objects_v2 failed") as err:
        store.versions()
    assert s3_settings["model_store_secret_key"] not in str(err.value)


def test_a_missing_bucket_is_named(s3_settings):
    from learner.store import StoreUnavailable

    store = open_model_store(Settings(**{**s3_settings, "model_store": "s3://no-such-bucket-hw/x"}))
    with pytest.raises(StoreUnavailable, match="NoSuchBucket"):
        store.latest()
    assert store.location == "s3://no-such-bucket-hw/x/ranker"


def test_the_secret_key_is_never_printed(s3_settings):
    settings = Settings(**s3_settings)
    secret = s3_settings["model_store_secret_key"]
    assert secret not in repr(settings) and secret not in str(settings.model_dump())
    store = open_model_store(settings)
    assert secret not in repr(vars(store))
