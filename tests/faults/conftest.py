"""The fault tests' stack: a worker environment with its own persistent Redis."""

from __future__ import annotations

import pytest

from headwater.servers import free_port, start_redis
from tests.stackutil import Service, service_env

PARTITIONS = 4


@pytest.fixture
def stack(kafka_bootstrap, tmp_path, topic_prefix):
    """A worker environment with its own persistent Redis (AOF) for the test."""
    redis_server = start_redis(data_dir=tmp_path / "redis", log_path=tmp_path / "redis.log")
    url = redis_server.extra["url"]
    env = service_env(kafka_bootstrap, url, topic_prefix, tmp_path,
                      HEADWATER_CONTENT_ENCODER="hashing", HEADWATER_CLICK_BATCH_SIZE=500)
    from core.settings import Settings
    from streams.topics import ensure_topics

    ensure_topics(Settings(topic_prefix=topic_prefix, partitions=PARTITIONS), kafka_bootstrap)
    services: list[Service] = []
    state = {"redis": redis_server, "url": url, "env": env, "services": services,
             "kafka": kafka_bootstrap, "prefix": topic_prefix, "tmp": tmp_path}

    def start_worker(**extra) -> Service:
        # Each worker its own metrics port: a second worker on the first one's port could
        # not bind its web server (its /metrics and /healthz would be the first's).
        extra.setdefault("HEADWATER_WORKER_PORT", free_port())
        svc = Service("worker", dict(env, **{k: str(v) for k, v in extra.items()}), tmp_path / "logs")
        services.append(svc)
        return svc

    state["start_worker"] = start_worker
    state["logs"] = lambda: "\n".join(s.log()[-3000:] for s in services)
    try:
        yield state
    finally:
        for svc in services:
            svc.stop()
        state["redis"].stop()
