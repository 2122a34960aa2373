"""The OpenAPI document: a valid OpenAPI 3.1 document, every route of the app in it (and
nothing else), served at /openapi.json, and real responses that validate against it."""

from __future__ import annotations

import jsonschema
import pytest
import redis.asyncio as aioredis
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

from serving.app import build_context, create_app, openapi_document
from tests.openapi_check import check
from tests.serving.conftest import auth


def test_the_document_is_valid_openapi():
    validate(openapi_document())


async def test_every_route_is_documented_and_every_documented_route_exists(
        settings, redis_db, builder, kafka_bootstrap):
    settings = settings.model_copy(update={"kafka": kafka_bootstrap})
    client = aioredis.Redis.from_url(redis_db)
    ctx = build_context(settings, client, builder=builder, registry=CollectorRegistry())
    ctx.kafka = kafka_bootstrap
    try:
        app = create_app(settings, ctx, ops=True)
        routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()
                  if r.method != "HEAD"}
        documented = {(path, method) for path, ops in openapi_document()["paths"].items()
                      for method in ops}
        assert routes == documented
    finally:
        ctx.holder.close()
        ctx.scorer.executor.shutdown(wait=True)
        await client.aclose()


async def test_real_responses_validate(settings, seeded_redis, publish, make_app):
    publish(0)
    client, _ = await make_app(settings, seeded_redis)
    calls = [
        ("/v1/score", "post", {"json": {"user_id": "u1", "candidates": ["i1", "i2", "nope"]}}, 200),
        ("/v1/score", "post", {"json": {"requests": [{"user_id": "u1", "candidates": ["i1"]},
                                                    {"user_id": "u2", "candidates": ["i2", "i3"]}]}}, 200),
        ("/v1/score", "post", {"json": {"user_id": "u1"}}, 400),
        ("/v1/score", "post", {"json": {"user_id": "u1", "candidates": "i1"}}, 400),
        ("/healthz", "get", {}, 200),
        ("/readyz", "get", {}, 200),
        ("/v1/models", "get", {}, 200),
        ("/v1/models/1", "get", {}, 200),
        ("/v1/models/x1", "get", {}, 400),
        ("/v1/models/unpin", "post", {"headers": auth()}, 200),
        ("/v1/models/rollback", "post", {}, 401),
    ]
    for url, method, kw, status in calls:
        resp = await client.request(method, url, **kw)
        assert resp.status == status, (url, await resp.text())
        template = "/v1/models/{version}" if url.startswith("/v1/models/") and url[11:].lstrip(
            "x").isdigit() else url
        check(template, method, status, await resp.json())
    served = await (await client.get("/openapi.json")).json()
    assert served == openapi_document()


def test_the_checker_refuses_what_the_document_does_not_allow():
    with pytest.raises(jsonschema.ValidationError):
        check("/v1/score", "post", 200, {"model_version": "000001", "scores": [1.5]})
    with pytest.raises(jsonschema.ValidationError):
        check("/readyz", "get", 200, {"ready": True})
