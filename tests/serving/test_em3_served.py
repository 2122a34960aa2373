"""EM3 Fusion-Q-Former fields served: item content from real Redis, computed once per
loaded version (never per request), scores equal the model's own forward."""

from __future__ import annotations

import numpy as np
import redis.asyncio as aioredis
import torch

from features.codebook_store import CodebookStore
from learner.models import ModelSpec, build_model
from streams.item_content import em3_spec, item_content_table
from streams.item_path import make_encoder


def _publish_em3(store, builder, settings, seed: int) -> tuple[str, ModelSpec]:
    schema = builder.schema
    em3 = {**em3_spec(settings), "d_model": 8, "n_heads": 2}
    spec = ModelSpec("deepfm", schema.categorical, schema.dense, {"embedding_dim": 4, "mlp": [8]},
                     {"kind": "hashed", "dim": 5, "buckets": 997}, em3=em3)
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    manifest = store.publish({"model": model.state_dict()}, config={"model": spec.to_dict()},
                             feature_schema_json=schema.to_json(), feature_schema_hash=schema.hash,
                             rows_trained=100, watermarks={}, metrics={"auc": 0.7})
    return manifest["version"], spec


async def test_qformer_fields_are_served_once_per_version(settings, seeded_redis, store, builder,
                                                        make_app, h):
    settings = settings.model_copy(update={"em3_queries": 2, "content_encoder": "hashing",
                                           "redis": seeded_redis})
    # The items path's content (the real encoder, as the worker stores it).
    items = [{"item_id": i, "text": f"movie {i}", "tags": [g]}
             for i, g in (("i1", "Comedy"), ("i2", "Drama"), ("i3", "Horror"))]
    content = make_encoder("hashing").encode(items).fused()
    client = aioredis.Redis.from_url(seeded_redis)  # written by the items path's own store
    books = CodebookStore(client, CodebookStore.config_name(
        settings.content_encoder, settings.code_levels, settings.codebook_size, settings.vq_k),
        lease_seconds=60, codes_key=str)
    await books.put_content([it["item_id"] for it in items], content)
    await client.aclose()
    version, spec = _publish_em3(store, builder, settings, 0)
    app, ctx = await make_app(settings, seeded_redis)
    served = ctx.holder.current
    assert served.version == version
    em3 = served.model.em3
    computed = em3.computed
    assert computed == 3 + 1  # every stored item, and the no-content row, at load

    cands = ["i1", "i2", "i3", "i2"]
    scores = []
    for _ in range(3):
        resp = await app.post("/v1/score", data=h.score_body("u1", cands))
        assert resp.status == 200, await resp.text()
        scores.append((await resp.json())["scores"])
    assert em3.computed == computed  # no Q-Former pass per request
    # The same weights, fields computed afresh from Redis's content: the same scores.
    fresh = build_model(spec)
    fresh.load_state_dict(served.model.state_dict())
    fresh.eval()
    fresh.em3.attach(item_content_table(settings, seeded_redis))

    class Fresh:
        @staticmethod
        def predict(cat, dense):
            with torch.no_grad():
                return torch.sigmoid(fresh.logits(cat, dense)).double().numpy()

    want = h.expected_scores(Fresh, builder, seeded_redis, settings.partitions, "u1", cands)
    for got in scores:
        np.testing.assert_allclose(got, want, rtol=1e-5)
    # A new version computes its own fields, once, at its load.
    v2, _ = _publish_em3(store, builder, settings, 1)
    assert await ctx.holder.submit(ctx.holder.offer, v2) is True
    assert ctx.holder.current.model.em3.computed == 3 + 1
    assert em3.computed == computed
