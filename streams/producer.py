"""kafka-python producers: files, dataset replays and the audit shipper send through here."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import msgspec
from kafka import KafkaProducer
from kafka.errors import KafkaError

from core import kafka as kafka_clients

log = logging.getLogger(__name__)


def make_producer(bootstrap: str, connect_timeout: float = 30.0, **overrides) -> KafkaProducer:
    """A throughput-tuned producer; retries with backoff while the broker is unreachable.

    kafka-python 3 defaults to idempotence (acks=all); we keep it: duplicates from
    producer retries would be counted twice downstream otherwise.
    """
    config = dict(linger_ms=20, batch_size=1 << 20, max_request_size=kafka_clients.MAX_MESSAGE_BYTES,
                  acks="all", retries=10, client_id="headwater")
    config.update(overrides)
    deadline = time.monotonic() + connect_timeout
    delay = 0.2
    while True:
        try:
            return kafka_clients.producer(bootstrap, **config)
        except KafkaError as exc:
            if time.monotonic() + delay > deadline:
                raise RuntimeError(f"Kafka broker at {bootstrap} unreachable: {exc}") from exc
            log.warning("broker %s unreachable (%s); retrying in %.1fs", bootstrap, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


_enc = msgspec.json.Encoder()


def envelopes(events: Iterable[dict], size: int) -> Iterator[tuple[bytes, int]]:
    """Group events into JSON-array envelopes of at most ``size`` events."""
    chunk: list[dict] = []
    for ev in events:
        chunk.append(ev)
        if len(chunk) >= size:
            yield _enc.encode(chunk), len(chunk)
            chunk = []
    if chunk:
        yield _enc.encode(chunk), len(chunk)


class RateLimiter:
    """Sleeps so that ``n`` events take ``n / rate`` seconds (rate 0: unlimited)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def wait(self, n: int) -> None:
        self.sent += n
        if self.rate <= 0:
            return
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)
