"""A real worker process shared by the streams integration tests."""

from __future__ import annotations

import socket
import time

import pytest
import redis

from tests.stackutil import Service, service_env, wait_until


def instance_of(svc: Service) -> str:
    return f"{socket.gethostname()}-{svc.proc.pid}"


# Module scope: this directory is not a Python package (a ``tests/streams/__init__.py``
# would shadow the product's ``streams``), and pytest scopes a "package" fixture outside a
# package to the whole session: the worker would outlive these files and beat into the
# session's Redis under other files' tests (e.g. the ops tests' worker totals).
@pytest.fixture(scope="module")
def worker(kafka_bootstrap, redis_url, tmp_path_factory):
    prefix = f"w{int(time.time() * 1000) % 10**8}-"
    tmp = tmp_path_factory.mktemp("worker")
    env = service_env(kafka_bootstrap, redis_url, prefix, tmp, HEADWATER_CONTENT_ENCODER="hashing")
    svc = Service("worker", env, tmp / "logs")
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: client.get(f"hw:status:worker:{instance_of(svc)}"), 90,
                   what="worker heartbeat", on_fail=svc.log)
        yield {"prefix": prefix, "svc": svc, "kafka": kafka_bootstrap, "redis": client}
    finally:
        svc.stop()
        client.close()
