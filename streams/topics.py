"""Topic declarations: the contract names of DESIGN.md, created on start."""

from __future__ import annotations

import logging
import time

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from headwater.servers import port_open
from headwater.settings import Settings

log = logging.getLogger(__name__)

#: Topics whose partitions follow ``Settings.partitions``; the rest have one.
PARTITIONED = ("clicks", "items", "audit", "train-batches", "alerts", "dead-letter")


def topic_specs(settings: Settings) -> list[NewTopic]:
    specs = []
    for logical, real in settings.topics.items():
        if logical == "model-updates":
            # One key per model name; compaction keeps the newest publication.
            specs.append(NewTopic(real, 1, 1, topic_configs={"cleanup.policy": "compact"}))
        else:
            n = settings.partitions if logical in PARTITIONED else 1
            specs.append(NewTopic(real, n, 1))
    return specs


def wait_for_broker(bootstrap: str, timeout: float) -> None:
    """Block until one bootstrap address accepts TCP connections, with capped backoff.

    Probing the socket ourselves keeps the message plain (the Kafka clients retry
    internally and only log connection errors) and names the address tried.
    """
    deadline = time.monotonic() + timeout
    delay = 0.2
    addresses = [a.strip() for a in bootstrap.split(",") if a.strip()]
    while True:
        for address in addresses:
            host, _, port = address.rpartition(":")
            if port_open(host or "127.0.0.1", int(port), timeout=1.0):
                return
        if time.monotonic() + delay > deadline:
            raise RuntimeError(
                f"Kafka broker at {bootstrap} unreachable for {timeout:.0f}s; "
                "start it (headwater up) or set HEADWATER_KAFKA"
            )
        log.warning("Kafka broker at %s unreachable; retrying in %.1fs", bootstrap, delay)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def ensure_topics(settings: Settings, bootstrap: str, timeout: float = 30.0) -> list[str]:
    """Create the missing topics; retries with backoff while the broker is unreachable.

    Returns the names created. Raises ``RuntimeError`` naming the broker when it never
    answers within ``timeout``.
    """
    wait_for_broker(bootstrap, timeout)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="headwater-admin",
                             request_timeout_ms=10_000)
    try:
        existing = set(admin.list_topics())
        missing = [s for s in topic_specs(settings) if s.name not in existing]
        created = []
        for spec in missing:
            try:
                admin.create_topics([spec])
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
