"""Watch for new model versions: the ``model-updates`` topic, plus a store rescan.

The topic is the fast path: a kafka-python consumer on its own thread (blocking polls
stay off the event loop), **without a consumer group** — every serving replica must see
every publication, and manual assignment skips the group join that Tansu holds for half
a session timeout. It reads the compacted topic from the beginning; versions the holder
already knows are ignored, so nothing published between the startup scan and the first
poll can be missed. The periodic store rescan is the slow path for a lost message or an
unreachable broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from core import kafka as kafka_clients

__all__ = ["ModelWatcher", "parse_update"]

log = logging.getLogger(__name__)


def parse_update(value: bytes | None, model: str) -> str | None:
    """The version a ``model-updates`` message announces for ``model``, else None.

    >>> parse_update(b'{"model": "ranker", "version": "000003"}', "ranker")
    '000003'
    >>> parse_update(b'{"model": "other", "version": "000003"}', "ranker") is None
    True
    """
    if not value:
        return None
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("model") != model:
        return None
    version = doc.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        version = f"{version:06d}"
    if not isinstance(version, str) or not version.isdigit() or not version.isascii():
        return None
    return version


class ModelWatcher:
    """Calls ``on_version(version)`` (a coroutine function, on ``loop``) for each announcement.

    ``rescan`` (a coroutine function) runs every ``rescan_seconds``. :meth:`start`
    launches both; :meth:`stop` ends them. ``bootstrap`` None disables the topic path.
    """

    def __init__(
        self,
        bootstrap: str | None,
        topic: str,
        model: str,
        on_version: Callable[[str], Awaitable[Any]],
        rescan: Callable[[], Awaitable[Any]] | None = None,
        *,
        rescan_seconds: float = 5.0,
        fetch_max_wait_ms: int = 20,
        poll_timeout_ms: int = 200,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.model = model
        self.on_version = on_version
        self.rescan = rescan
        self.rescan_seconds = rescan_seconds
        # Tansu never wakes a long poll early: a publication can wait this long to be seen
        self.fetch_max_wait_ms = min(fetch_max_wait_ms, 100)
        self.poll_timeout_ms = poll_timeout_ms
        self.messages = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rescan_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.bootstrap:
            self._thread = threading.Thread(target=self._consume, name="model-updates", daemon=True)
            self._thread.start()
        if self.rescan is not None:
            self._rescan_task = asyncio.create_task(self._rescan_loop(), name="model-rescan")

    async def stop(self) -> None:
        self._stop.set()
        if self._rescan_task is not None:
            self._rescan_task.cancel()
            try:
                await self._rescan_task
            except asyncio.CancelledError:
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    async def _rescan_loop(self) -> None:
        assert self.rescan is not None
        while not self._stop.is_set():
            await asyncio.sleep(self.rescan_seconds)
            try:
                await self.rescan()
            except Exception as exc:  # noqa: BLE001 - keep watching
                self.last_error = f"store rescan failed: {exc!r}"
                log.warning(self.last_error)

    def _deliver(self, version: str) -> None:
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(self.on_version(version), self._loop)
        try:
            # Waiting keeps announcements in order and bounds the queue to one.
            while not self._stop.is_set():
                try:
                    fut.result(timeout=0.5)
                    return
                except TimeoutError:
                    continue
        except Exception as exc:  # noqa: BLE001 - a failed load is the holder's to report
            log.warning("handling version %s failed: %r", version, exc)

    def _consume(self) -> None:
        from kafka import TopicPartition

        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = kafka_clients.consumer(
                        self.bootstrap,
                        group_id=None,
                        enable_auto_commit=False,
                        fetch_max_wait_ms=self.fetch_max_wait_ms,
                        client_id="headwater-serving-watcher",
                    )
                if not consumer.assignment():
                    parts = consumer.partitions_for_topic(self.topic)
                    if not parts:
                        self._stop.wait(1.0)  # topic not created yet
                        continue
                    tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
                    consumer.assign(tps)
                    consumer.seek_to_beginning(*tps)
                batches = consumer.poll(timeout_ms=self.poll_timeout_ms)
                for records in batches.values():
                    for rec in records:
                        self.messages += 1
                        version = parse_update(rec.value, self.model)
                        if version is not None:
                            self._deliver(version)
            except Exception as exc:  # noqa: BLE001 - the broker may come and go
                self.last_error = f"model-updates consumer: {exc!r}"
                log.warning(self.last_error)
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:  # noqa: BLE001
                        pass
                consumer = None
                self._stop.wait(2.0)
        if consumer is not None:
            consumer.close()
