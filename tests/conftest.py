"""Shared fixtures: a real Tansu broker and a real Redis server per test session.

Both run as child processes on free loopback ports (``headwater.servers``, the same
code the embedded stack uses). ``HEADWATER_TEST_KAFKA`` / ``HEADWATER_TEST_REDIS`` point
the suite at existing servers instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import default_data_dir
from headwater.servers import start_broker, start_redis

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = default_data_dir()
    if not (path / "ml-100k").exists():
        pytest.fail(f"datasets not found at {path}: set HEADWATER_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> Iterator[str]:
    """host:port of a real Kafka-protocol broker (Tansu, memory storage)."""
    if os.environ.get("HEADWATER_TEST_KAFKA"):
        yield os.environ["HEADWATER_TEST_KAFKA"]
        return
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    server = start_broker(log_path=log)
    try:
        yield f"{server.host}:{server.port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (no persistence) for the session."""
    if os.environ.get("HEADWATER_TEST_REDIS"):
        yield None
        return
    log = tmp_path_factory.mktemp("redis") / "redis.log"
    server = start_redis(log_path=log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    if redis_server is None:
        return os.environ["HEADWATER_TEST_REDIS"]
    return redis_server.extra["url"]


@pytest.fixture
def redis_db(redis_url) -> Iterator[str]:
    """A Redis URL whose database is flushed before and after the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    try:
        yield redis_url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic prefix so tests sharing the session broker never see each other's data."""
    return f"t{uuid.uuid4().hex[:8]}-"
