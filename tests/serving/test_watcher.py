"""The watcher: message parsing, and the full serving process following a real topic."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from headwater.servers import free_port
from serving.app import serve
from serving.watcher import parse_update


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b'{"model": "ranker", "version": "000007", "path": "/x"}', "000007"),
        (b'{"model": "ranker", "version": 7}', "000007"),
        (b'{"model": "other", "version": "000007"}', None),
        (b'{"model": "ranker", "version": "../x"}', None),
        (b'{"model": "ranker", "version": true}', None),
        (b"not json", None),
        (b"[]", None),
        (None, None),
    ],
)
def test_parse_update(value, expected):
    assert parse_update(value, "ranker") == expected


def _create_topic(bootstrap: str, name: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="serving-test")
    try:
        admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=1,
                    replication_factor=1,
                    topic_configs={"cleanup.policy": "compact"},
                )
            ]
        )
    finally:
        admin.close()


def _announce(bootstrap: str, topic: str, manifest: dict) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, enable_idempotence=False)
    try:
        producer.send(topic, key=manifest["model"].encode(), value=json.dumps(manifest).encode())
        producer.flush(10)
    finally:
        producer.close()


@pytest.mark.integration
async def test_serving_follows_model_updates_topic(
    settings, seeded_redis, publish, store, kafka_bootstrap, topic_prefix
):
    settings = settings.model_copy(update={"topic_prefix": topic_prefix, "http_port": free_port()})
    topic = settings.topics["model-updates"]
    await asyncio.to_thread(_create_topic, kafka_bootstrap, topic)
    publish(0)
    stop, ready = asyncio.Event(), asyncio.Event()
    # The store rescan is pushed out of the test's reach: only the topic can deliver.
    task = asyncio.create_task(
        serve(settings, kafka_bootstrap, seeded_redis, stop, ready, rescan_seconds=3600)
    )
    base = f"http://{settings.bind_host}:{settings.http_port}"
    try:
        await asyncio.wait_for(ready.wait(), 20)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200
                assert (await resp.json())["model_version"] == "000001"
            v2 = publish(1)
            manifest = {**store.manifest(v2), "path": str(store.path(v2))}
            await asyncio.to_thread(_announce, kafka_bootstrap, topic, manifest)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while True:
                async with http.get(f"{base}/v1/models") as resp:
                    doc = await resp.json()
                if doc["serving"] == v2:
                    break
                assert loop.time() < deadline, f"serving did not pick up {v2}: {doc}"
                await asyncio.sleep(0.1)
            async with http.post(
                f"{base}/v1/score", data=json.dumps({"user_id": "u1", "candidates": ["i1", "zz"]})
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["model_version"] == v2
        # The heartbeat reached Redis with what headwater status shows.
        import redis.asyncio as aioredis

        from core.health import read_all_async

        client = aioredis.Redis.from_url(seeded_redis)
        try:
            for _ in range(50):
                docs = [d for d in await read_all_async(client) if d["service"] == "serving"]
                if docs and docs[0]["model_version"] == v2:
                    break
                await asyncio.sleep(0.1)
            assert docs and docs[0]["model_version"] == v2 and docs[0]["requests_total"] >= 1
        finally:
            await client.aclose()
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
