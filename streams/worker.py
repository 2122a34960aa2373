"""``headwater worker``: the Faust worker process with the clicks, items and audit agents."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from core.health import PERIOD_S, make_status, publish_async
from core.heap import settle
from core.redis_client import connect_async
from core.settings import Settings
from detection.alert_store import save_alerts
from detection.baseline_store import BaselineStore
from detection.state_store import DetectionStateStore
from features.asof import warm as warm_replay
from streams.alignment_path import ClickPairs
from streams.app import (
    FaustSink,
    add_web_pages,
    batched_agent,
    create_app,
    highwater,
    pause_partition,
)
from streams.audit_path import AuditHandler, audit_engine_config
from streams.batching import TakePolicy
from streams.click_path import click_handler
from streams.events import KafkaLog
from streams.item_path import ItemHandler
from streams.join_path import JoinHandler
from streams.metrics import WorkerMetrics

log = logging.getLogger(__name__)

#: How often the worker asks Redis whether it restarted (then verifies every partition).
REDIS_CHECK_S = 1.0
#: How often the joiner re-evaluates idle partitions' watermarks.
JOIN_TICK_S = 1.0


class WorkerState:
    """What the worker reports in its heartbeat and ``/healthz``."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.started_at = time.time()
        self.last_error: str | None = None
        self.redis_ok = True
        #: click partitions stopped (REWIND): partition -> reason (set by the click handler)
        self.stopped: dict[int, str] = {}
        #: audit partitions stopped (REWIND): partition -> reason (set by the audit handler)
        self.audit_stopped: dict[int, str] = {}
        #: topic -> partitions this worker holds now
        self.assigned: dict[str, set[int]] = {}
        #: the item codebook version in use (set by the items handler)
        self.codebook_version = lambda: None
        #: whether this worker runs the online joiner (HEADWATER_JOIN)
        self.join = False

    def on_error(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _total(self, counter) -> int:
        return int(sum(s.value for m in counter.collect() for s in m.samples
                       if s.name.endswith("_total")))

    def _registry_total(self, name: str) -> int:
        """A counter another component registered on the worker's registry, summed."""
        return int(sum(s.value for m in self.metrics.registry.collect() if m.name == name
                       for s in m.samples if s.name == f"{name}_total"))

    def status(self) -> dict:
        m = self.metrics
        return {
            "events_in_total": self._total(m.events_in),
            "events_valid_total": self._total(m.events_valid),
            "dead_letter_total": self._total(m.dead_letters),
            "duplicates_total": self._registry_total("headwater_features_duplicate_events"),
            "rows_out_total": int(sum(s.value for mm in m.events_out.collect() for s in mm.samples
                                      if s.name.endswith("_total") and s.labels.get("topic", "").endswith("train-batches"))),
            "alerts_total": self._total(m.alerts),
            "items_coded_total": self._total(m.items_coded),
            "redis_ok": self.redis_ok,
            "stopped_partitions": {**{f"clicks[{p}]": why for p, why in self.stopped.items()},
                                   **{f"audit[{p}]": why for p, why in self.audit_stopped.items()}},
            "assigned": {t: sorted(ps) for t, ps in self.assigned.items() if ps},
            "codebook_version": self.codebook_version(),
            "join": self.join,
        }


def click_take(settings: Settings) -> TakePolicy:
    """The click agent's takes: bounded in events, lingering only while clicks arrive,
    pipelined ``click_pipeline_depth`` deep (:func:`streams.app.pipelined_takes`).

    >>> click_take(Settings(click_batch_events=300)).max_events
    300
    """
    return TakePolicy(max_events=settings.click_batch_events, max_messages=settings.click_batch_size,
                      within=settings.click_batch_within, gap=settings.click_batch_gap,
                      depth=settings.click_pipeline_depth,
                      within_backlog=settings.click_batch_backlog_within)


def build_app(settings: Settings, bootstrap: str, redis_url: str, web: bool = True):
    """The worker's Faust app with its three agents and heartbeat timer."""
    metrics = WorkerMetrics()
    state = WorkerState(metrics)
    app = create_app(settings, bootstrap, app_id=f"{settings.topic_prefix}headwater-worker",
                     web_port=settings.worker_port if web else None)
    client = connect_async(redis_url, socket_timeout=5, socket_connect_timeout=2)
    topics = settings.topics
    audit_pool = ThreadPoolExecutor(1, thread_name_prefix="audit")

    events = KafkaLog(bootstrap)
    sink = FaustSink(app, state.on_error)  # the click path's repairs and the joiner's outbox
    clicks = click_handler(settings, client, metrics, state, bootstrap, sink=sink,
                           pause=lambda partition: pause_partition(app, topics["clicks"], partition))
    state.stopped = clicks.stopped
    items = ItemHandler(settings, client, metrics, state)
    state.codebook_version = lambda: items.version
    if settings.align_online:
        pairs = ClickPairs(items.codebooks, settings.align_window, settings.align_max_pairs)

        async def mine(cols) -> None:
            try:
                await pairs.observe(cols)
            except Exception as exc:  # noqa: BLE001 - the rows went out; pairs are optional
                log.exception("mining alignment pairs failed")
                state.on_error(exc)

        clicks.on_clicks = mine
    audit = AuditHandler(topics, metrics, alert_sink=lambda alerts: save_alerts(client, alerts),
                         executor=audit_pool, config=audit_engine_config(settings),
                         baseline_store=BaselineStore(client, settings.audit_baseline_ttl),
                         state_store=DetectionStateStore(client),
                         read_range=events.read_range, log_end=events.log_end,
                         snapshot_every=settings.audit_snapshot_every,
                         journal_max_bytes=settings.audit_journal_max_bytes)
    n = settings.partitions
    dlq = topics["dead-letter"]
    batched_agent(app, topics["clicks"], n, clicks, settings.click_batch_size,
                  settings.click_batch_within, "clicks", state.on_error, dlq,
                  take=click_take(settings))
    batched_agent(app, topics["items"], n, items, 2000, 0.05, "items", state.on_error, dlq)
    batched_agent(app, topics["audit"], n, audit, settings.audit_batch_size,
                  settings.audit_batch_within, "audit", state.on_error, dlq)
    joiner = None
    state.join = settings.join
    if settings.join:  # HEADWATER_JOIN: labels from impressions + actions (docs/contracts.md)
        joiner = JoinHandler(settings, client, metrics, state, builder=clicks.builder,
                             store=clicks.store)
        joiner.events = events
        joiner.send = sink.send
        joiner.highwater = lambda topic, p: highwater(app, topic, p)
        batched_agent(app, (topics["impressions"], topics["actions"]), n, joiner,
                      settings.click_batch_size, settings.click_batch_within, "join",
                      state.on_error, dlq)
    add_web_pages(app, metrics.registry, state.status)

    state.audit_stopped = audit.stopped
    audit.pause = lambda partition: pause_partition(app, topics["audit"], partition)

    async def guarded(what: str, coro) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - retried on the next check
            log.exception("%s failed", what)
            state.on_error(exc)

    @app.on_partitions_assigned.connect
    async def on_assigned(app_, assigned, **kwargs):
        # The offsets recorded beside the counter state are the truth: every assigned
        # partition is checked against the group's committed offset now (in a task: a
        # rebalance must not wait on it), so a Redis that lost writes is caught up.
        for tp in assigned:
            state.assigned.setdefault(tp.topic, set()).add(tp.partition)
        joined = {tp.partition for tp in assigned if tp.topic == topics["impressions"]}
        if joiner is not None:
            joiner.on_assigned(joined)
            if joined:  # what a crash left unsent goes out first
                asyncio.ensure_future(guarded("sending the join outbox", joiner.flush_all()))
        mine = {tp.partition for tp in assigned if tp.topic == topics["clicks"]}
        clicks.on_assigned(mine)
        if mine:
            asyncio.ensure_future(guarded("verifying assigned partitions",
                                          clicks.verify_assigned(mine, app.conf.id)))

    @app.on_partitions_revoked.connect
    async def on_revoked(app_, revoked, **kwargs):
        for tp in revoked:
            state.assigned.get(tp.topic, set()).discard(tp.partition)
        clicks.on_revoked({tp.partition for tp in revoked if tp.topic == topics["clicks"]})
        if joiner is not None:
            joiner.on_revoked({tp.partition for tp in revoked if tp.topic == topics["impressions"]})
        audit.forget({tp.partition for tp in revoked if tp.topic == topics["audit"]})

    @app.timer(REDIS_CHECK_S)
    async def check_redis():
        await guarded("verifying partitions after a Redis restart", clicks.check_redis())

    if joiner is not None:
        @app.timer(JOIN_TICK_S)
        async def join_tick():
            # windows close by the watermark; an idle partition's advances with the clock
            await guarded("advancing the join watermark", joiner.tick())

    @app.timer(PERIOD_S)
    async def sync_codebooks():
        # Every worker uses the published version, even one that gets no item events.
        await guarded("loading the current codebooks", items.sync())

    @app.timer(settings.codebook_refresh_seconds)
    async def refresh_codebooks():
        try:
            await items.refresh()
        except Exception as exc:  # noqa: BLE001 - a failed refresh keeps the old codes
            log.exception("codebook refresh failed")
            state.on_error(exc)

    @app.timer(PERIOD_S)
    async def heartbeat():
        doc = make_status("worker", state.started_at, **state.status())
        doc["healthy"] = state.redis_ok and not state.stopped and not state.audit_stopped
        doc["last_error"] = state.last_error
        try:
            await publish_async(client, doc)
            state.redis_ok = True
        except Exception as exc:  # noqa: BLE001 - a Redis outage is reported, not fatal
            state.redis_ok = False
            state.on_error(exc)

    app.headwater = {"metrics": metrics, "state": state, "clicks": clicks, "items": items,
                     "joiner": joiner,
                     "audit": audit, "redis": client}
    return app


def run_worker(settings: Settings, bootstrap: str, redis_url: str) -> int:
    from faust import Worker

    from streams.topics import ensure_topics

    ensure_topics(settings, bootstrap, timeout=120)
    app = build_app(settings, bootstrap, redis_url)
    warm_replay()  # the compiled point-in-time replay, before the first batch needs it
    worker = Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    asyncio.set_event_loop(worker.loop)
    settle(settings.worker_gc_young)  # the start-up heap, out of the collector's walks
    worker.execute_from_commandline()
    return 0
