"""Serving fixtures: a real model store with real torch checkpoints, real Redis, the real app.

Checkpoints are published with the learner's :class:`~learner.store.ModelStore` and
tiny rankers (logistic regression, DeepFM with a 8-wide MLP) built for the real row
builder's feature schema, so loads go through the same verify + ``weights_only`` path
as production. Redis is seeded through the real online store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import torch
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from core.settings import Settings
from features.rows import RowBuilder
from features.schema import FeatureSchema
from features.store import SyncOnlineStore
from learner.models import ModelSpec, build_model, preset_head
from learner.store import LocalModelStore, ModelStore
from serving.app import build_context, create_app, default_row_builder

torch.set_num_threads(1)

ADMIN_TOKEN = "s3cret-token"
NOW = 1_800_000_000.0  # a fixed scoring clock, so expected scores can be recomputed exactly


@pytest.fixture(scope="session")
def builder() -> RowBuilder:
    """The row builder ``headwater serve`` and the worker derive from the settings."""
    return default_row_builder(Settings())


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        model_store=tmp_path / "models",
        model_name="ranker",
        admin_token=ADMIN_TOKEN,
        max_candidates=200,
        max_body_bytes=64 * 1024,
        partitions=2,
        state_dir=tmp_path / "state",
    )


@pytest.fixture
def store(settings) -> ModelStore:
    return LocalModelStore(settings.model_store, settings.model_name, keep=settings.keep_versions)


def _spec(schema: FeatureSchema, kind: str) -> ModelSpec:
    if kind == "lr":
        return ModelSpec(
            "lr", schema.categorical, schema.dense, {}, {"kind": "hashed", "dim": 1, "buckets": 997}
        )
    if kind == "fgcnn":  # the default ranker at its default (lean) size, small tables
        head = preset_head("fgcnn", "lean")
        return ModelSpec("fgcnn", schema.categorical, schema.dense, head,
                         {"kind": "hashed", "dim": head["embedding_dim"], "buckets": 997})
    return ModelSpec(
        "deepfm",
        schema.categorical,
        schema.dense,
        {"embedding_dim": 4, "mlp": [8]},
        {"kind": "hashed", "dim": 5, "buckets": 997},
    )


@pytest.fixture
def publish(store, builder) -> Callable[..., str]:
    """Publish a real checkpoint; ``nan=True`` poisons a weight, ``schema`` overrides the hash."""

    def _publish(
        seed: int = 0,
        *,
        kind: str = "lr",
        nan: bool = False,
        schema: FeatureSchema | None = None,
        metrics: dict | None = None,
    ) -> str:
        schema = schema or builder.schema
        torch.manual_seed(seed)
        model = build_model(_spec(schema, kind))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05)
            if nan:
                # The output layer: embedding tables are checkpointed packed (only rows
                # training touched), so a NaN in an untouched row would not be saved.
                list(model.parameters())[-1].view(-1)[0] = float("nan")
        manifest = store.publish(
            {"model": model.state_dict()},
            config={"model": model.spec.to_dict()},
            feature_schema_json=schema.to_json(),
            feature_schema_hash=schema.hash,
            rows_trained=100 * (seed + 1),
            watermarks={},
            metrics=metrics or {"auc": 0.7},
        )
        return manifest["version"]

    return _publish


@pytest.fixture
def seeded_redis(redis_db, settings) -> str:
    """Redis with counters for users u1/u2 and items i1..i3 (i1 popular), attributes and codes."""
    client = redis.Redis.from_url(redis_db)
    online = SyncOnlineStore(client, partitions=settings.partitions)
    online.put_item_attributes(
        {"i1": {"genres": ["Comedy"], "year": 1995}, "i2": {"genres": ["Drama"], "year": 1999}},
        ts=NOW - 1000,
    )
    events = []
    for k in range(40):
        item = "i1" if k % 2 == 0 else ("i2" if k % 4 == 1 else "i3")
        events.append(
            {
                "event_id": f"e{k}",
                "ts": NOW - 500 + k,
                "user_id": "u1" if k < 30 else "u2",
                "item_id": item,
                "label": int(item == "i1"),
                "offset": k,
                "sub": 0,
                "user": {"age": 25, "gender": "F"},
            }
        )
    online.apply_batch("clicks", 0, events)
    online.set_item_codes("i1", {"rq": [3, 1, 4, 1, 5, 9], "vq": [2, 6, 5, 3]}, "cb1")
    client.close()
    return redis_db


async def _make_client(settings, redis_url, builder, **kw) -> tuple[TestClient, object]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    kw.setdefault("redis_url", redis_url)  # feature reads over core.redis_client.RoundTrips, as served
    ctx = build_context(settings, client, builder=builder, registry=CollectorRegistry(), **kw)
    ctx.scorer.clock = lambda: NOW
    app = create_app(settings, ctx)
    tc = TestClient(TestServer(app))
    await tc.start_server()
    return tc, ctx


@pytest.fixture
async def make_app(builder) -> AsyncIterator[Callable]:
    """Factory: ``await make_app(settings, redis_url, start=True, **context_kwargs)`` -> (client, ctx)."""
    made = []

    async def _make(settings, redis_url, start: bool = True, **kw):
        tc, ctx = await _make_client(settings, redis_url, builder, **kw)
        made.append((tc, ctx))
        if start:
            await ctx.holder.submit(ctx.holder.start)
        return tc, ctx

    yield _make
    for tc, ctx in made:
        await tc.close()
        ctx.holder.close()
        if ctx.scorer.executor is not None:
            ctx.scorer.executor.shutdown(wait=True)
        await ctx.redis.aclose()


def auth(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def metric_value(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (0 if absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def tamper(store: ModelStore, version: str) -> None:
    """Flip one byte of ``model.pt`` (same size, different sha256)."""
    path = store.path(version) / "model.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


async def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def score_body(user="u1", candidates=("i1", "i2", "i3"), context=None) -> bytes:
    doc = {"user_id": user, "candidates": list(candidates)}
    if context is not None:
        doc["context"] = context
    return json.dumps(doc).encode()


def expected_scores(
    served, builder, redis_url, partitions, user, candidates, context=None
) -> np.ndarray:
    """Scores recomputed outside the app: sync store read + row builder + model."""
    client = redis.Redis.from_url(redis_url)
    online = SyncOnlineStore(client, partitions=partitions)
    feats = online.get_online_features(
        [{"user_id": user, "item_id": c, "context": context} for c in candidates], now=NOW
    )
    client.close()
    cols = builder.build_for_scoring(user, None, context, list(candidates), feats, now=NOW)
    cat = np.stack([cols[f"c:{f}"] for f in builder.schema.categorical], axis=1)
    dense = np.stack([cols[f"d:{d}"] for d in builder.schema.dense], axis=1)
    return served.predict(cat, dense)


class Helpers:
    """Plain functions the tests share (conftest is not importable as a module)."""

    NOW = NOW
    ADMIN_TOKEN = ADMIN_TOKEN
    auth = staticmethod(auth)
    metric = staticmethod(metric_value)
    tamper = staticmethod(tamper)
    wait_for = staticmethod(wait_for)
    score_body = staticmethod(score_body)
    expected_scores = staticmethod(expected_scores)


@pytest.fixture
def h() -> type[Helpers]:
    return Helpers
