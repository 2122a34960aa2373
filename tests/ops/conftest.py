"""An ops server for the tests: the real routes on a real port, over the session's real
Redis and broker, with real heartbeat documents published through core.health."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.structs import OffsetAndMetadata

from core.health import make_status, publish_async
from core.settings import Settings
from headwater.servers import free_port
from serving.ops import add_ops_routes

PERIOD = 0.5  # samplers' period in tests (2 s in serving) so windows fill quickly


def _app_factory():
    """The real serving app if its factory exists, else a bare aiohttp app."""
    try:
        from serving.app import create_app  # noqa: F401 - being written beside this module
    except ImportError:
        return None
    return create_app


async def publish_heartbeats(client, t0: float, events: int, rows: int, auc: float) -> dict:
    worker_a = make_status("worker", t0, events_in_total=events, events_valid_total=events - 3,
                           dead_letter_total=3, rows_out_total=events // 2)
    worker_a["instance"] = "host-a-1"
    worker_b = make_status("worker", t0, events_in_total=100, events_valid_total=100,
                           dead_letter_total=0, rows_out_total=50)
    worker_b["instance"] = "host-b-2"
    worker_b["last_error"] = "RedisError: connection reset (retried)"
    learner = make_status("learner", t0, model_version="000007", rows_trained=rows,
                          prequential_auc=auc, prequential_logloss=0.512)
    for doc in (worker_a, worker_b, learner):
        await publish_async(client, doc)
    return {"worker": [worker_a, worker_b], "learner": [learner]}


def make_lagging_group(bootstrap: str, prefix: str) -> tuple[str, str]:
    topic, group = f"{prefix}clicks", f"{prefix}worker"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 2, 1)])
    admin.close()
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i in range(30):
        p.send(topic, b"{}", partition=i % 2)
    p.flush()
    p.close()
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    c.commit({TopicPartition(topic, 0): OffsetAndMetadata(15, "", -1),
              TopicPartition(topic, 1): OffsetAndMetadata(4, "", -1)})
    c.close()
    return topic, group


@pytest.fixture
async def ops_server(kafka_bootstrap, redis_db, topic_prefix):
    client = aioredis.Redis.from_url(redis_db)
    t0 = time.time() - 42.0
    docs = await publish_heartbeats(client, t0, events=1000, rows=500, auc=0.71)
    topic, group = make_lagging_group(kafka_bootstrap, topic_prefix)
    settings = Settings(kafka=kafka_bootstrap, redis=redis_db, topic_prefix=topic_prefix)
    app = web.Application()
    state = add_ops_routes(app, settings=settings, redis=client, kafka=kafka_bootstrap, redis_url=redis_db,
                           period=PERIOD, lag_window=3)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    info = {"base": f"http://127.0.0.1:{port}", "state": state, "client": client, "docs": docs,
            "t0": t0, "topic": topic, "group": group, "settings": settings,
            "app": "bare aiohttp app + add_ops_routes"}
    try:
        yield info
    finally:
        try:
            await asyncio.wait_for(runner.cleanup(), 15)
        except TimeoutError:
            for t in asyncio.all_tasks():
                t.print_stack()
            raise
        await client.aclose()
