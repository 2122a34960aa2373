"""The Faust application factory: topics, broker tuning, agents, the worker's web pages.

This package is the only one that imports faust. Agents stay thin: they take batches
of events, group them by partition and hand each group to a domain handler
(:mod:`streams.handlers`), then produce what the handler returns.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import redis.exceptions
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry, generate_latest

from core import kafka as kafka_clients
from core.settings import Settings
from detection.state_store import StateFenced
from features.store_apply import FencedError, GapError
from streams.batching import Batcher, TakePolicy
from streams.deadletter import dead_letter
from streams.events import EventSink, Message, Output

log = logging.getLogger(__name__)

Handler = Callable[[str, int, list[Message]], Awaitable[list[Output]]]

_FETCH_WAIT_MS: int = Settings.model_fields["fetch_max_wait_ms"].default


def _patch_fetch_wait(fetch_max_wait_ms: int) -> None:
    """Make Faust's consumer use our fetch long-poll wait instead of its fixed 1.5 s.

    Tansu's fetch long-poll does not wake on new data (docs/measurements.md), so a long
    wait is pure latency: 1.5 s waits gave a 376 ms produce→processed p50, 50 ms gave
    15 ms. faust-streaming hard-codes the value in ``_create_worker_consumer``; the
    aiokafka consumer reads ``_fetch_max_wait_ms`` only when it starts, so setting it
    right after construction is enough.
    """
    global _FETCH_WAIT_MS
    _FETCH_WAIT_MS = fetch_max_wait_ms
    cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(cls, "_headwater_patched", False):
        return
    original = cls._create_worker_consumer

    def _create_worker_consumer(self, transport):
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = _FETCH_WAIT_MS
        return consumer

    cls._create_worker_consumer = _create_worker_consumer
    cls._headwater_patched = True


def create_app(settings: Settings, bootstrap: str, app_id: str = "headwater-worker",
               web_port: int | None = None) -> faust.App:
    """A Faust app configured for the embedded broker's behaviours.

    A short session timeout matters on Tansu: its coordinator holds a JoinGroup for
    half the session timeout, so the default 60 s session means a 30 s start.
    """
    _patch_fetch_wait(settings.fetch_max_wait_ms)
    session = settings.session_timeout
    datadir = settings.state_dir / "faust" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session,
        broker_heartbeat_interval=max(0.5, session / 6),
        broker_rebalance_timeout=max(session, 10.0),
        broker_request_timeout=max(session * 2, 40.0),
        broker_commit_interval=1.0,
        producer_linger=0.005,
        producer_max_request_size=settings.max_message_bytes * 2,
        producer_max_batch_size=settings.producer_batch_bytes,
        web_enabled=web_port is not None,
        web_port=web_port or 6066,
        web_bind=settings.bind_host,
        web_in_thread=False,
        stream_wait_empty=False,
        broker_credentials=faust_credentials(settings),
    )
    return app


def faust_credentials(settings: Settings):
    """Faust's broker credentials for the security settings (None: plaintext).

    >>> faust_credentials(Settings()) is None
    True
    >>> type(faust_credentials(Settings(kafka_security_protocol="SASL_PLAINTEXT",
    ...     kafka_sasl_username="svc", kafka_sasl_password="pw"))).__name__
    'SASLCredentials'
    """
    sec = kafka_clients.security(settings)
    context = None
    if sec.tls:
        context = ssl.create_default_context(cafile=sec.cafile)
        if sec.certfile:
            context.load_cert_chain(sec.certfile, sec.keyfile)
    if sec.sasl:
        return faust.SASLCredentials(username=sec.username, password=sec.password, ssl_context=context,
                                     mechanism=sec.mechanism)
    return faust.SSLCredentials(context) if context is not None else None


#: Failures of one batch before its messages are retried one by one.
POISON_AFTER = 3


def is_transient(exc: BaseException) -> bool:
    """Errors of the infrastructure (Redis, the broker, the network): retry, never drop."""
    return isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError, KafkaError, FencedError, GapError,
                            StateFenced,
                            redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            redis.exceptions.BusyLoadingError))


def batched_agent(app: faust.App, topic_name: str | tuple[str, ...], partitions: int, handler: Handler,
                  max_batch: int, within: float, name: str,
                  on_error: Callable[[BaseException], None] | None = None,
                  dead_letter_topic: str | None = None, *, sink: EventSink | None = None,
                  sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                  take: TakePolicy | None = None) -> None:
    """Register an agent that feeds ``handler`` one partition's batch at a time.

    Outputs are produced before the batch is acknowledged, so a crash between the two
    replays the batch (at-least-once); handlers make replays harmless. Several topic
    names make one agent over all of them (Faust then assigns the same partition number
    of each to the same worker: co-partitioned); each batch handed over holds one
    topic's partition. ``sink`` takes the outputs (default: the app's producer,
    :class:`FaustSink`); ``sleep`` waits between retries (a test passes
    :meth:`headwater.testing.ManualClock.sleep`).

    ``take`` makes the agent pipelined (:func:`pipelined_takes`): adaptive takes bounded
    in events (:class:`streams.batching.Batcher`), and while one take is handled, the
    outputs of up to ``take.depth`` earlier ones are produced and their messages
    acknowledged, in order, each only after its outputs are on the broker. Without it,
    Faust's ``take_events(max_batch, within)``, one take at a time.
    """
    sink = sink if sink is not None else FaustSink(app, on_error)
    names = (topic_name,) if isinstance(topic_name, str) else tuple(topic_name)
    topic = app.topic(*names, partitions=partitions, value_type=bytes, key_type=bytes,
                      value_serializer="raw", key_serializer="raw")

    # A handler that sets ``concurrent_partitions`` gets a take's partitions handled
    # concurrently: each partition's batch stays whole and ordered, and their Redis round
    # trips overlap instead of queueing behind each other.
    concurrent = bool(getattr(handler, "concurrent_partitions", False))

    async def handle(topic_name: str, partition: int, messages: list[Message]) -> list[Output]:
        attempt = 0
        while True:
            try:
                return await handler(topic_name, partition, messages)
            except Exception as exc:  # noqa: BLE001 - the worker must keep consuming
                attempt += 1
                if on_error:
                    on_error(exc)
                if not is_transient(exc) and attempt >= POISON_AFTER and dead_letter_topic:
                    log.error("handler %s failed %d times on partition %d (%r): isolating messages",
                              name, attempt, partition, exc)
                    return await isolate(topic_name, partition, messages)
                log.exception("handler %s failed on partition %d; retrying", name, partition)
                await sleep(min(0.5 * attempt, 5.0))

    async def isolate(topic_name: str, partition: int, messages: list[Message]) -> list[Output]:
        """Retry message by message; one that still fails goes to dead-letter, not in a loop.

        A deterministic failure (a bug meeting an input nobody foresaw) must not stall its
        partition forever; transient failures (Redis, the broker) keep being retried.
        """
        outputs: list[Output] = []
        for message in messages:
            while True:
                try:
                    outputs.extend(await handler(topic_name, partition, [message]))
                    break
                except Exception as exc:  # noqa: BLE001
                    if is_transient(exc):
                        await sleep(0.5)
                        continue
                    offset, key, value = message
                    reason = (f"{name}: internal error processing this message: "
                              f"{type(exc).__name__}: {exc}")
                    log.error("dead-lettering %s[%d]@%d: %s", topic_name, partition, offset, reason)
                    outputs.append((dead_letter_topic, key,
                                    dead_letter(reason, topic_name, partition, offset, value), None))
                    break
        return outputs

    async def handle_take(events) -> list[Output]:
        groups: dict[tuple[str, int], list[Message]] = defaultdict(list)
        for event in events:
            msg = event.message
            groups[msg.topic, msg.partition].append((msg.offset, msg.key, msg.value))
        if concurrent and len(groups) > 1:
            results = await asyncio.gather(*(handle(t, p, m) for (t, p), m in groups.items()))
        else:
            results = [await handle(t, p, m) for (t, p), m in groups.items()]
        return [out for outputs in results for out in outputs]

    async def agent(stream):
        if take is not None:
            await pipelined_takes(stream, take, handle_take, sink, consumer_highwater(app))
            return
        async for events in stream.take_events(max_batch, within=within):
            sends = await handle_take(events)
            if sends:
                await sink.send(sends)

    agent.__name__ = name
    app.agent(topic, name=name)(agent)


async def pipelined_takes(stream, policy: TakePolicy,
                          handle_take: Callable[[list], Awaitable[list[Output]]],
                          sink: EventSink,
                          highwater: Callable[[Any], int | None] | None = None) -> None:
    """Consume ``stream`` in adaptive takes, handling one while earlier ones are produced.

    The stream feeds a :class:`streams.batching.Batcher` (Faust's own acks off); one
    task handles takes one after another (so a partition's batches are applied in offset
    order, as before). A handled take's outputs go to ``sink`` in a finishing task that
    first waits for the previous take's (outputs stay in take order), then acknowledges
    the take's messages: an offset is committed only after its batch's writes and its
    outputs are durable, so a crash replays at most the takes in flight, which the
    handler makes harmless. At most ``policy.depth`` takes are finishing while the next
    is handled. ``highwater(tp)`` (the consumer's log end of a partition, None: unknown)
    tells a take whether more messages are waiting, so it keeps collecting under a backlog.
    """
    last: dict[Any, int] = {}  # partition -> offset of the last message buffered

    def backlog() -> bool:
        if highwater is None:
            return False
        for tp, offset in last.items():
            end = highwater(tp)
            if end is not None and end > offset + 1:
                return True
        return False

    batcher = Batcher(policy.max_events, policy.max_messages, policy.within, policy.gap,
                      backlog=backlog, within_backlog=policy.within_backlog)
    weigh = policy.weigh
    stream.enable_acks = False

    async def finish(previous: asyncio.Future | None, events: list, sends: list[Output]) -> None:
        if previous is not None:
            await previous
        if sends:
            await sink.send(sends)
        for event in events:
            await stream.ack(event)

    async def run() -> None:
        inflight: deque[asyncio.Future] = deque()
        try:
            async for events in batcher.takes():
                sends = await handle_take(events)
                last = inflight[-1] if inflight else None
                inflight.append(asyncio.ensure_future(finish(last, events, sends)))
                while len(inflight) > policy.depth:
                    await inflight.popleft()
            while inflight:
                await inflight.popleft()
        except BaseException as exc:
            for task in inflight:
                task.cancel()
            batcher.fail(exc if isinstance(exc, Exception) else RuntimeError("take handler stopped"))
            raise

    runner = asyncio.ensure_future(run())
    try:
        async for event in stream.events():
            message = event.message
            last[message.tp] = message.offset
            await batcher.put(event, weigh(message.value))
        batcher.close()
        await runner
    finally:
        if not runner.done():
            runner.cancel()


async def send_all(app: faust.App, sends: list[Output],
                    on_error: Callable[[BaseException], None] | None) -> None:
    """Produce every output, retrying until the broker takes them.

    The batch is acknowledged only after this returns, so retrying here (rather than
    letting the agent crash and restart) keeps the at-least-once promise without
    reprocessing work that already succeeded.
    """
    delay = 0.2
    while True:
        try:
            futures = [await app.producer.send(t, k, v, partition=p, timestamp=None, headers=None)
                       for t, k, v, p in sends]
            await asyncio.gather(*futures)
            return
        except Exception as exc:  # noqa: BLE001 - broker hiccups are retried, never dropped
            log.warning("producing %d records failed (%s); retrying in %.1fs", len(sends), exc, delay)
            if on_error:
                on_error(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class FaustSink:
    """The worker's :class:`streams.events.EventSink`: the Faust app's producer, retried
    until the broker takes every record (:func:`send_all`)."""

    def __init__(self, app: faust.App,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.app = app
        self.on_error = on_error

    async def send(self, outputs: list[Output]) -> None:
        await send_all(self.app, outputs, self.on_error)


def consumer_highwater(app) -> Callable[[Any], int | None] | None:
    """The log end offset of an assigned partition as the app's consumer last fetched it
    (None when not known); None for an app without a consumer (a test harness)."""
    if not isinstance(app, faust.App):
        return None

    def highwater_of(tp) -> int | None:
        try:
            return app.consumer.highwater(tp)
        except Exception:  # noqa: BLE001 - not assigned, or the consumer is (re)starting
            return None

    return highwater_of


def pause_partition(app: faust.App, topic: str, partition: int) -> None:
    """Stop fetching one partition (the others go on); a rebalance undoes it."""
    app.consumer.pause_partitions({TP(topic, partition)})


def highwater(app: faust.App, topic: str, partition: int) -> int | None:
    """The log end offset of one assigned partition as the consumer last fetched it (None:
    not known yet)."""
    try:
        return app.consumer.highwater(TP(topic, partition))
    except Exception:  # noqa: BLE001 - not assigned, or the consumer is (re)starting
        return None


def add_web_pages(app: faust.App, registry: CollectorRegistry,
                  status: Callable[[], dict[str, Any]]) -> None:
    """``/metrics`` (Prometheus) and ``/healthz`` on the worker's own web server."""

    @app.page("/metrics")
    async def metrics(self, request):
        return self.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

    @app.page("/healthz")
    async def healthz(self, request):
        return self.json({"ok": True, "ts": time.time(), **status()})
