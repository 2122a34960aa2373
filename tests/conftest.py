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


# Markers of tests that start, kill or record real processes (stacks, audit, a browser).
PROCESS_MARKS = ("integration", "faults", "audit", "browser")


def pytest_collection_modifyitems(config, items) -> None:
    """Run the files with process-starting tests first, in collection order, then the rest.

    ``make test`` hands whole files to two xdist workers (``--dist loadfile``); the long
    files starting first lets the short unit files fill in at the end instead of one
    worker running a long stack test alone. A stable sort: every file keeps its order.
    """
    heavy = {item.path for item in items
             if any(item.get_closest_marker(m) for m in PROCESS_MARKS)}
    items.sort(key=lambda item: item.path not in heavy)


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


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """URL of an S3-compatible endpoint over real HTTP: moto's standalone server.

    moto is an emulator (no real S3 server installs here: docs/decisions.md); it runs
    as its own process on a free loopback port, so the services reach it like any
    object store. ``HEADWATER_TEST_S3`` points the suite at an existing endpoint.
    """
    if os.environ.get("HEADWATER_TEST_S3"):
        yield os.environ["HEADWATER_TEST_S3"]
        return
    import subprocess
    import sys
    import time

    from core.net import port_open
    from headwater.servers import free_port

    port = free_port()
    log = open(tmp_path_factory.mktemp("s3") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto server did not start (exit {proc.poll()}); see {log.name}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


S3_KEY, S3_SECRET = "headwater-test", "s3cret-model-store-key"


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)


@pytest.fixture
def s3_settings(s3_client, s3_endpoint, tmp_path) -> dict:
    """Settings for a fresh bucket on the test endpoint (created here)."""
    bucket = f"hw-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    return {"model_store": f"s3://{bucket}/headwater", "model_store_endpoint": s3_endpoint,
            "model_store_access_key": S3_KEY, "model_store_secret_key": S3_SECRET,
            "state_dir": tmp_path / "state"}
