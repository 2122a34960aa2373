"""EM3's content-interest sequence served: the app reads the user's recent clicks from
real Redis (written by the worker's own store), point in time at the scoring clock, and
the model scores the rows that carry them."""

from __future__ import annotations

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import torch

from core.settings import Settings
from features.codebook_store import CodebookStore
from features.defaults import row_builder
from features.hashing import hash_tokens
from features.store import SyncOnlineStore
from learner.models import ModelSpec, build_model
from serving.app import default_row_builder
from streams.item_content import em3_spec, item_content_table
from streams.item_path import make_encoder
from tests.serving.conftest import NOW

SEQ = {"seq_len": 3, "em3_queries": 1, "em3_seq_lora_rank": 2, "content_encoder": "hashing"}


@pytest.fixture
def builder():
    """The app's rows with the sequence (the worker's and serving's builder alike)."""
    b = default_row_builder(Settings(**SEQ))
    assert b.schema.categorical == row_builder(Settings(**SEQ)).schema.categorical
    return b


async def test_serving_scores_the_users_recent_clicks_before_now(settings, seeded_redis, store,
                                                                  builder, make_app, h):
    settings = settings.model_copy(update={**SEQ, "redis": seeded_redis})
    items = [{"item_id": i, "text": f"movie {i}", "tags": [g]}
             for i, g in (("i1", "Comedy"), ("i2", "Drama"), ("i3", "Horror"))]
    client = aioredis.Redis.from_url(seeded_redis)  # the items path's own content writer
    books = CodebookStore(client, CodebookStore.config_name(
        settings.content_encoder, settings.code_levels, settings.codebook_size, settings.vq_k),
        lease_seconds=60, codes_key=str)
    await books.put_content([it["item_id"] for it in items],
                            make_encoder("hashing").encode(items).fused())
    await client.aclose()
    # u1's clicks through the worker's store: two before the scoring clock, one after it,
    # one not a click (label 0).
    sync = redis.Redis.from_url(seeded_redis)
    online = SyncOnlineStore(sync, partitions=settings.partitions, seq_len=3)
    clicks = [("i2", NOW - 100, 1), ("i1", NOW - 80, 0), ("i3", NOW - 50, 1), ("i1", NOW + 10, 1)]
    online.apply_batch("clicks", 1, [
        {"event_id": f"s{k}", "ts": ts, "user_id": "u1", "item_id": it, "label": lab,
         "offset": k, "sub": 0} for k, (it, ts, lab) in enumerate(clicks)])
    sync.close()

    schema = builder.schema
    spec = ModelSpec("deepfm", schema.categorical, schema.dense, {"embedding_dim": 4, "mlp": [8]},
                     {"kind": "hashed", "dim": 5, "buckets": 997},
                     em3={**em3_spec(settings), "d_model": 8, "n_heads": 2})
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for name, p in model.em3.sequence.named_parameters():
            if "lora_B" in name:
                p.normal_()  # trained adapters
    store.publish({"model": model.state_dict()}, config={"model": spec.to_dict()},
                  feature_schema_json=schema.to_json(), feature_schema_hash=schema.hash,
                  rows_trained=100, watermarks={}, metrics={"auc": 0.7})
    app, ctx = await make_app(settings, seeded_redis)
    assert ctx.holder.current.model.em3.sequence is not None
    cands = ["i1", "i2", "i3"]
    resp = await app.post("/v1/score", data=h.score_body("u1", cands))
    assert resp.status == 200, await resp.text()
    got = np.asarray((await resp.json())["scores"])

    # The rows serving must have built: seq0 = i3 (newest before NOW), seq1 = i2, no third;
    # the click after NOW and the non-click never count.
    read = SyncOnlineStore.from_url(seeded_redis, partitions=settings.partitions, seq_len=3)
    feats = read.get_online_features([{"user_id": "u1", "item_id": c} for c in cands], now=NOW)
    read.close()
    assert feats["user_seq"] == [("i2", "i3")] * 3
    cols = builder.build_for_scoring("u1", None, None, cands, feats, now=NOW)
    i2, i3 = hash_tokens("item_id", ["i2", "i3"]).tolist()
    assert (cols["c:seq0"] == i3).all() and (cols["c:seq1"] == i2).all()
    assert (cols["c:seq2"] == 0).all()
    cat = np.stack([cols[f"c:{f}"] for f in schema.categorical], axis=1)
    dense = np.stack([cols[f"d:{d}"] for d in schema.dense], axis=1)
    fresh = build_model(spec)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    fresh.em3.attach(item_content_table(settings, seeded_redis))
    with torch.no_grad():
        want = torch.sigmoid(fresh.logits(cat, dense)).double().numpy()
        blind = cat.copy()
        blind[:, [schema.categorical.index(f"seq{k}") for k in range(3)]] = 0
        without = torch.sigmoid(fresh.logits(blind, dense)).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.abs(got - without).max() > 1e-4  # the sequence moved the scores
