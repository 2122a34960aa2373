"""Delta publications on the real stack: broker, Redis, both model stores, the serving process.

Versions are announced on the ``model-updates`` topic of the real broker and only the
watcher (``serving.watcher.ModelWatcher``, no store rescan) delivers them; the app
scores at a fixed clock, so scores of two versions compare exactly. Serving applies
deltas on its loaded base and must then answer exactly what a full checkpoint of the
same weights answers. A delta on another base is refused and serving keeps its model.
"""

from __future__ import annotations

import asyncio
import functools
import json

import numpy as np
import pytest
import torch

from core.settings import Settings
from learner.model_stores import open_model_store
from learner.models import ModelSpec, build_model
from learner.store import LocalModelStore, compute_delta
from serving.watcher import ModelWatcher
from tests.serving.conftest import ADMIN_TOKEN
from tests.serving.test_watcher import _announce, _create_topic

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def stack_settings(request, settings, topic_prefix) -> Settings:
    update = {"topic_prefix": topic_prefix}
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_settings")
        update.update({k: v for k, v in s3.items() if k != "state_dir"})
    return Settings(**(settings.model_dump() | update))


def trained(model, seed: int, rows: list[int]) -> None:
    """What a training step does to a model: some table rows and every dense weight move."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("table.weight"):
                p[rows] += 0.3 * torch.randn(len(rows), p.shape[1], generator=g)
                model.embedding.mark_dirty(rows)
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


async def test_base_plus_deltas_serves_exactly_like_a_full_checkpoint(
    stack_settings, seeded_redis, builder, kafka_bootstrap, make_app
):
    settings = stack_settings
    store = open_model_store(settings)
    topic = settings.topics["model-updates"]
    await asyncio.to_thread(_create_topic, kafka_bootstrap, topic)
    schema = builder.schema
    torch.manual_seed(0)
    model = build_model(ModelSpec("deepfm", schema.categorical, schema.dense,
                                  {"embedding_dim": 4, "mlp": [8]},
                                  {"kind": "hashed", "dim": 5, "buckets": 997}))
    trained(model, 0, list(range(0, 997 * 3, 7)))
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}

    def publish_full() -> str:
        m = store.publish({"model": model.state_dict()}, config={"model": model.spec.to_dict()},
                          feature_schema_json=schema.to_json(), feature_schema_hash=schema.hash,
                          rows_trained=1, watermarks={}, metrics={"auc": 0.7})
        _announce(kafka_bootstrap, topic, m)
        return m["version"]

    def publish_delta(base: str) -> str:
        m = store.publish_delta(compute_delta(base_weights, model.state_dict()), base=base,
                                rows_trained=2, watermarks={}, metrics={"auc": 0.7})
        _announce(kafka_bootstrap, topic, m)
        return m["version"]

    base = await asyncio.to_thread(publish_full)
    http, ctx = await make_app(settings, seeded_redis, start=False)
    watcher = ModelWatcher(kafka_bootstrap, topic, settings.model_name,
                           functools.partial(ctx.holder.submit, ctx.holder.offer))
    watcher.start()
    body = json.dumps({"user_id": "u1", "candidates": ["i1", "i2", "i3"]}).encode()
    try:

        async def serving(version: str) -> list[float]:
            """Wait until ``version`` serves; its scores for one request."""
            for _ in range(1000):
                resp = await http.post("/v1/score", data=body)
                doc = await resp.json()
                if doc.get("model_version") == version:
                    return doc["scores"]
                await asyncio.sleep(0.02)
            raise AssertionError(f"version {version} never served (last: {doc})")

        async def get(path: str) -> dict:
            resp = await http.get(path)
            return await resp.json()

        base_scores = await serving(base)
        trained(model, 1, [3, 14, 500, 2000])
        d1 = await asyncio.to_thread(publish_delta, base)
        d1_scores = await serving(d1)
        assert d1_scores != base_scores
        doc = await get(f"/v1/models/{d1}")
        assert (doc["kind"], doc["base"], doc["state"]["state"]) == ("delta", base, "AVAILABLE")
        assert doc["manifest"]["base_sha256"] == store.manifest(base)["sha256"]
        # cumulative, not chained: a row moved back to its base value must go back too
        with torch.no_grad():
            model.embedding.table.weight[14] = base_weights_row(base_weights, model, 14)
        trained(model, 2, [21, 700])
        d2 = await asyncio.to_thread(publish_delta, base)
        d2_scores = await serving(d2)
        d2_model = ctx.holder.current
        full = await asyncio.to_thread(publish_full)
        assert await serving(full) == d2_scores  # exact: same weights, same floats
        full_model = ctx.holder.current
        assert d2_model.version == d2 and full_model.version == full
        # both deltas patched the loaded base model (no rebuild), which they left as it was
        assert d2_model.patched and d2_model.base.version == base
        assert ctx.holder.metrics.registry.get_sample_value(
            "headwater_model_deltas_applied_total", {"how": "patched"}) == 2
        assert base_unchanged(d2_model.base, store)
        a, b = d2_model.model.state_dict(), full_model.model.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        rng = np.random.default_rng(0)  # rows no request above touched
        cat = rng.integers(0, 2**40, size=(256, d2_model.n_categorical))
        dense = rng.uniform(0, 5, size=(256, d2_model.n_dense)).astype(np.float32)
        assert np.array_equal(d2_model.predict(cat, dense), full_model.predict(cat, dense))

        # a delta on another base: refused loudly, the serving model stays
        trained(model, 3, [1, 2])
        bad = await asyncio.to_thread(
            lambda: store.publish_delta(
                compute_delta(base_weights, model.state_dict()), base=base,
                rows_trained=3, watermarks={}, metrics={})["version"])
        forged = {**store.manifest(bad), "base_sha256": "0" * 64}
        await asyncio.to_thread(rewrite_manifest, store, bad, forged)
        await asyncio.to_thread(_announce, kafka_bootstrap, topic, forged)
        for _ in range(500):
            state = (await get(f"/v1/models/{bad}"))["state"]
            if state and state["state"] == "FAILED":
                break
            await asyncio.sleep(0.02)
        assert state["state"] == "FAILED" and "delta on another base" in state["error"]
        assert (await get("/v1/models"))["serving"] == full
        assert await serving(full) == d2_scores

        # deltas on the new full checkpoint; a restarted server loads base + delta from
        # the store (the base is not in its memory yet) and answers exactly the same
        base_weights.clear()
        base_weights.update({k: v.clone() for k, v in model.state_dict().items()})
        base = full
        trained(model, 4, [5, 6, 900])
        d3 = await asyncio.to_thread(publish_delta, full)
        d3_scores = await serving(d3)
        assert d3_scores != d2_scores
        http2, ctx2 = await make_app(settings, seeded_redis)
        assert ctx2.holder.current.version == d3 and ctx2.holder.current.base.version == full
        resp = await http2.post("/v1/score", data=body)
        assert (await resp.json())["scores"] == d3_scores
        # a pin to a delta version serves that delta on its base
        resp = await http2.post(f"/v1/models/{d3}/pin",
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert resp.status == 200, await resp.text()
        assert ctx2.holder.pinned == d3 and store.pins() == [d3]
    finally:
        await watcher.stop()


def base_weights_row(base_weights: dict, model, row: int) -> torch.Tensor:
    """Row ``row`` of the base's table (the packed state dict holds trained rows only)."""
    prefix = "embedding.table."
    ids = base_weights[prefix + "packed_rows"]
    hit = (ids == row).nonzero()
    if len(hit):
        return base_weights[prefix + "packed_values"][int(hit[0, 0])]
    return model.embedding.initial_rows()[row]


def rewrite_manifest(store, version: str, manifest: dict) -> None:
    data = json.dumps(manifest, sort_keys=True).encode()
    if isinstance(store, LocalModelStore):
        (store.dir / version / "manifest.json").write_bytes(data)
    else:
        store.client.put_object(Bucket=store.bucket, Key=f"{store.base}/{version}/manifest.json",
                                Body=data)


def base_unchanged(base, store) -> bool:
    """Whether a loaded full checkpoint still holds exactly its published weights."""
    published = store.load(base.version).state["model"]
    mine = base.model.state_dict()
    return set(mine) == set(published) and all(torch.equal(mine[k], published[k]) for k in mine)
