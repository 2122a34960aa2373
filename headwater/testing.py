"""A test kit for code built on Headwater (and for Headwater's own tests).

- :func:`embedded_stack` starts a real, throwaway stack (the embedded broker and Redis,
  plus the services you ask for) in a temporary directory on free ports, and stops and
  wipes it on exit. What it yields, :class:`RunningStack`, hands out the Python client
  already pointed at it.
- :class:`ManualClock` is a clock a test moves by hand, for the components that take a
  ``clock`` (the learner service, serving's holder, the served-lag tracker).

Example::

    from headwater.testing import embedded_stack

    with embedded_stack(services=("worker", "serve")) as stack:
        with stack.sender() as sender:
            sender.send_clicks([...])
        stack.serving().score("42", ["50"])
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import Settings
from headwater.client import EventSender, FeatureReader, ServingClient
from headwater.servers import free_port
from headwater.stack import SERVICES, down, up

__all__ = ["ManualClock", "RunningStack", "embedded_stack"]

log = logging.getLogger(__name__)


class ManualClock:
    """A clock that moves only when told to.

    >>> clock = ManualClock(100.0)
    >>> clock(), clock.advance(2.5), clock()
    (100.0, 102.5, 102.5)
    """

    def __init__(self, start: float = 1_000_000_000.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"a clock does not go back: advance({seconds})")
        self.now += seconds
        return self.now


@dataclass
class RunningStack:
    """Addresses of a running stack and clients for it."""

    settings: Settings
    kafka: str
    redis: str
    http: str

    def sender(self, **options: Any) -> EventSender:
        return EventSender(self.kafka, topic_prefix=self.settings.topic_prefix, **options)

    def serving(self, **options: Any) -> ServingClient:
        token = self.settings.admin_token_value()
        return ServingClient(self.http, admin_token=token, **options)

    def features(self) -> FeatureReader:
        return FeatureReader(self.redis, partitions=self.settings.partitions,
                             features=str(self.settings.features) if self.settings.features else None)


@contextmanager
def embedded_stack(root: str | Path | None = None, *, services: tuple[str, ...] = SERVICES,
                   timeout: float = 120.0, **settings: Any) -> Iterator[RunningStack]:
    """Start a throwaway stack; ``settings`` override :class:`core.settings.Settings` fields.

    State lives under ``root`` (default: a new temporary directory, removed on exit);
    on exit the stack is stopped and its state purged. Defaults suit tests: free ports,
    the hashing content encoder (no model download).
    """
    made = root is None
    base = Path(tempfile.mkdtemp(prefix="headwater-stack-")) if made else Path(root)
    values = {
        "state_dir": base / "state", "model_store": base / "state" / "models",
        "kafka_port": 0, "redis_port": 0, "http_port": free_port(), "worker_port": free_port(),
        "learner_port": free_port(), "content_encoder": "hashing", "kafka": None, "redis": None,
    }
    values.update(settings)
    config = Settings(**values)
    state = up(config, services, timeout=timeout, echo=log.info)
    try:
        yield RunningStack(config, state.kafka, state.redis, state.http)
    finally:
        down(config, echo=log.info, purge=True)
        if made:
            shutil.rmtree(base, ignore_errors=True)
