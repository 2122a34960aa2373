"""Ops API of serving: lag, status, alerts, a time series of status samples, the dashboard.

:func:`add_ops_routes` mounts, on the serving app:

``GET /``               the operator dashboard (``serving/static/dashboard.html``, no CDN);
``GET /v1/status``      the ``headwater status --json`` document (every service's heartbeat,
                        broker and Redis addresses and reachability) plus the serving
                        model (version, freshness, swaps) and the lag summary;
``GET /v1/lag``         the latest :class:`serving.lag.LagMonitor` report;
``GET /v1/alerts``      alerts through :func:`detection.alert_store.query_alerts`
                        (``host``, ``since``, ``until``, ``min_severity``, ``limit``);
``GET /v1/timeseries``  a ring buffer of compact status points (``?since=ts``).

Two background tasks (started with the app, cancelled on cleanup) sample every
``period`` seconds: the lag monitor (blocking kafka-python, so in a thread; its windows
fill only if it is sampled regularly) and the status, whose points feed the time series
and the swap history. Requests read the last samples: a slow broker never slows a page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from core.health import read_all_async
from core.net import redact_url
from core.settings import Settings
from detection.alert_store import query_alerts
from serving.holder import ModelHolder
from serving.lag import LagMonitor

log = logging.getLogger(__name__)

__all__ = ["OPS_KEY", "LagCollector", "OpsState", "add_ops_routes", "build_status", "status_point"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
SEVERITIES = ("low", "medium", "high", "critical")
MAX_ALERT_LIMIT = 1000
OPS_KEY = web.AppKey("headwater_ops", object)


def _redis_address(client: aioredis.Redis, settings: Settings) -> str:
    if settings.redis:
        return settings.redis
    try:
        kw = client.connection_pool.connection_kwargs
        if "path" in kw:
            return f"unix://{kw['path']}"
        return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    except AttributeError:
        return "unknown"


async def _port_open(address: str, timeout: float = 0.5) -> bool:
    host, _, port = address.split(",")[0].rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except (TimeoutError, OSError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class OpsState:
    """What the ops routes share: clients, the lag monitor, the last samples, the ring buffer."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, kafka: str,
                 holder: ModelHolder | None = None,
                 redis_address: str | None = None, period: float = 2.0, lag_window: int = 10,
                 history: int = 900, monitor: LagMonitor | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.kafka = kafka
        self.holder = holder
        self.redis_address = redact_url(redis_address or _redis_address(redis, settings))
        self.period = period
        self.monitor = monitor or LagMonitor(kafka, window=lag_window)
        self.lag_report: dict[str, Any] | None = None
        self.lag_error: str | None = None
        self.series: deque[dict[str, Any]] = deque(maxlen=history)
        self.swaps: deque[dict[str, Any]] = deque(maxlen=50)
        self._serving_version: str | None = None
        self._lag_lock = asyncio.Lock()
        # kafka-python clients are not safe to close while a sample runs on another
        # thread (a cancelled to_thread keeps running): sample and close take turns.
        self._monitor_lock = threading.Lock()
        self.started_at = time.time()
        # Set by the app's cleanup before it cancels the samplers: asyncio.wait_for on
        # Python 3.11 can swallow a cancellation that lands as its inner call completes
        # (a status sample reads Redis under wait_for), and a sampler loop that only
        # relied on CancelledError then ran on and held shutdown until its own timeout.
        self.stopping = False

    # ---- lag ------------------------------------------------------------------------
    async def sample_lag(self) -> dict[str, Any] | None:
        async with self._lag_lock:
            try:
                self.lag_report = await asyncio.to_thread(self._sample_monitor)
                self.lag_error = None
            except Exception as exc:  # noqa: BLE001 - reported on /v1/lag and the page
                self.lag_error = f"{type(exc).__name__}: {exc}"
                log.warning("lag sample failed: %s", self.lag_error)
        return self.lag_report

    def _sample_monitor(self) -> dict[str, Any]:
        with self._monitor_lock:
            return self.monitor.sample()

    def close_monitor(self) -> None:
        with self._monitor_lock:
            self.monitor.close()

    def lag_document(self) -> dict[str, Any]:
        report = dict(self.lag_report or {"ts": None, "window": self.monitor.window, "groups": []})
        report["error"] = self.lag_error
        report["period_s"] = self.period
        return report

    # ---- model ----------------------------------------------------------------------
    def model_document(self, now: float) -> dict[str, Any] | None:
        holder = self.holder
        if holder is None:
            return None
        cur = holder.current
        created = _finite(cur.created_at) if cur is not None else None
        doc: dict[str, Any] = {
            "serving": cur.version if cur is not None else None,
            "pinned": holder.pinned,
            "created_at": created,
            "freshness_seconds": None if created is None else round(max(0.0, now - created), 3),
            "swaps_total": holder.swaps,
            "last_error": holder.last_error,
            "recent_swaps": list(self.swaps)[::-1],
        }
        try:
            doc["versions"] = holder.listing().get("models", [])[:20]
        except OSError as exc:  # the model store's disk: the page shows what it can
            doc["versions_error"] = repr(exc)
        return doc

    def note_swap(self, now: float) -> None:
        cur = self.holder.current if self.holder is not None else None
        version = cur.version if cur is not None else None
        if version != self._serving_version:
            if self._serving_version is not None or version is not None:
                self.swaps.append({"ts": now, "from": self._serving_version, "to": version})
            self._serving_version = version

    # ---- status and time series -------------------------------------------------------
    async def sample_status(self) -> dict[str, Any]:
        doc = await build_status(self)
        point = status_point(doc, self.lag_report, self.series[-1] if self.series else None)
        self.series.append(point)
        return doc

    async def run(self, what: str) -> None:
        sample = self.sample_lag if what == "lag" else self.sample_status
        while not self.stopping:
            t0 = time.monotonic()
            try:
                await sample()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a sampler must outlive one bad sample
                log.exception("ops %s sample failed", what)
            await asyncio.sleep(max(0.05, self.period - (time.monotonic() - t0)))


async def build_status(state: OpsState) -> dict[str, Any]:
    """The ``headwater status --json`` document, from serving's own clients.

    Same keys as :func:`headwater.commands.collect_status` (``kafka``, ``redis``,
    ``services``), plus ``ts``, ``model`` (when serving holds one) and ``lag`` (summary).
    """
    now = time.time()
    doc: dict[str, Any] = {
        "ts": now,
        "kafka": {"address": state.kafka, "reachable": await _port_open(state.kafka)},
        "redis": {"address": state.redis_address},
        "services": {},
    }
    try:
        services = await asyncio.wait_for(read_all_async(state.redis), 3.0)
        doc["redis"]["reachable"] = True
    except Exception as exc:  # noqa: BLE001 - status reports, never raises
        doc["redis"]["reachable"] = False
        doc["redis"]["error"] = str(exc) or type(exc).__name__
        services = []
    for s in services:
        doc["services"].setdefault(s.get("service", "unknown"), []).append(s)
    if state.holder is not None:
        state.note_swap(now)
        doc["model"] = state.model_document(now)
    report = state.lag_report
    if report is not None or state.lag_error:
        groups = (report or {}).get("groups", [])
        doc["lag"] = {
            "ts": (report or {}).get("ts"),
            "error": state.lag_error,
            "total": sum(g.get("lag", 0) for g in groups),
            "groups": {g["group"]: g["status"] for g in groups},
        }
    return doc


def _sum(docs: list[dict[str, Any]], key: str) -> float | None:
    vals = [v for v in (_finite(d.get(key)) for d in docs) if v is not None]
    return sum(vals) if vals else None


def status_point(doc: dict[str, Any], lag: dict[str, Any] | None,
                 prev: dict[str, Any] | None) -> dict[str, Any]:
    """One compact time-series point of a status document; rates against ``prev``.

    Counters are summed over a service's instances; a counter that went down (a
    restart) gives no rate for that step rather than a negative one.

    >>> a = status_point({"ts": 10.0, "services": {"worker": [{"events_in_total": 100}]}}, None, None)
    >>> b = status_point({"ts": 12.0, "services": {"worker": [{"events_in_total": 300}]}}, None, a)
    >>> b["events_per_s"]
    100.0
    """
    services = doc.get("services", {})
    workers = services.get("worker", [])
    learners = services.get("learner", [])
    learner = max(learners, key=lambda d: d.get("updated_at") or 0, default={})
    model = doc.get("model") or {}
    groups = (lag or {}).get("groups", [])
    point: dict[str, Any] = {
        "ts": doc["ts"],
        "events_in_total": _sum(workers, "events_in_total"),
        "events_valid_total": _sum(workers, "events_valid_total"),
        "dead_letter_total": _sum(workers, "dead_letter_total"),
        # the fields of the learner heartbeat (streams.learner_runner._heartbeat)
        "rows_trained": _finite(learner.get("rows_trained")),
        "auc": _finite(learner.get("prequential_auc")),
        "served_auc": _finite(learner.get("served_auc")),
        "logloss": _finite(learner.get("prequential_logloss")),
        "learner_version": learner.get("model_version"),
        "serving_version": model.get("serving"),
        "freshness_s": _finite(model.get("freshness_seconds")),
        "lag_total": sum(g.get("lag", 0) for g in groups) if lag else None,
        "lag_max_seconds": max((_finite(g.get("max_lag_seconds")) or 0.0 for g in groups),
                               default=0.0) if lag else None,
    }
    for total, rate in (("events_in_total", "events_per_s"), ("rows_trained", "rows_per_s")):
        point[rate] = None
        if prev is not None and point[total] is not None and prev.get(total) is not None:
            dt = point["ts"] - prev["ts"]
            delta = point[total] - prev[total]
            if dt > 0 and delta >= 0:
                point[rate] = round(delta / dt, 3)
    return point


# ---- handlers ------------------------------------------------------------------------
def _state(request: web.Request) -> OpsState:
    return request.app[OPS_KEY]


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def handle_status(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response(await build_status(state), dumps=_dumps)


async def handle_lag(request: web.Request) -> web.Response:
    state = _state(request)
    if state.lag_report is None and state.lag_error is None:
        await state.sample_lag()  # the first request before the task's first sample
    return web.json_response(state.lag_document(), dumps=_dumps)


def _parse_time(name: str, raw: str | None) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be epoch seconds (a number), got {raw[:40]!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {raw[:40]!r}")
    return v


async def handle_alerts(request: web.Request) -> web.Response:
    q = request.query
    unknown = sorted(set(q) - {"host", "since", "until", "min_severity", "limit"})
    if unknown:
        return _json_error(400, f"unknown query parameter(s) {unknown}; "
                                "use host, since, until, min_severity, limit")
    try:
        since = _parse_time("since", q.get("since"))
        until = _parse_time("until", q.get("until"))
    except ValueError as exc:
        return _json_error(400, str(exc))
    if since is not None and until is not None and since > until:
        return _json_error(400, f"since ({since}) is after until ({until})")
    sev = q.get("min_severity") or None
    if sev is not None and sev not in SEVERITIES:
        return _json_error(400, f"min_severity must be one of {', '.join(SEVERITIES)}, got {sev[:40]!r}")
    raw_limit = q.get("limit", "100")
    try:
        limit = int(raw_limit)
    except ValueError:
        return _json_error(400, f"limit must be an integer, got {raw_limit[:40]!r}")
    if not 1 <= limit <= MAX_ALERT_LIMIT:
        return _json_error(400, f"limit must be between 1 and {MAX_ALERT_LIMIT}, got {limit}")
    host = q.get("host") or None
    state = _state(request)
    try:
        alerts = await query_alerts(state.redis, host=host, since=since, until=until,
                                    min_severity=sev, limit=limit)
    except Exception as exc:  # noqa: BLE001 - Redis down: say so, with the cause
        return _json_error(503, f"alert store unavailable: {exc}")
    return web.json_response({"alerts": alerts, "count": len(alerts)}, dumps=_dumps)


async def handle_timeseries(request: web.Request) -> web.Response:
    state = _state(request)
    try:
        since = _parse_time("since", request.query.get("since"))
    except ValueError as exc:
        return _json_error(400, str(exc))
    points = [p for p in state.series if since is None or p["ts"] > since]
    return web.json_response({"period_s": state.period, "capacity": state.series.maxlen,
                              "points": points}, dumps=_dumps)


async def handle_dashboard(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "dashboard.html",
                            headers={"Cache-Control": "no-cache",
                                     "Content-Type": "text/html; charset=utf-8"})


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, default=str, allow_nan=False)


class LagCollector:
    """Exports the last lag report to Prometheus at scrape time (no extra broker calls).

    ``headwater_consumer_lag_messages`` / ``headwater_consumer_lag_seconds`` per group,
    topic and partition (bounded label sets: no ids), and
    ``headwater_consumer_group_status`` as the status rank (0 OK, 1 WARNING, 2 REWIND,
    3 STALL, 4 STOP) so an alert rule can say ``>= 3``.
    """

    def __init__(self, state: OpsState) -> None:
        self.state = state

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from serving.lag import Status

        labels = ["group", "topic", "partition"]
        msgs = GaugeMetricFamily("headwater_consumer_lag_messages",
                                 "Committed offset to log end, in messages.", labels=labels)
        secs = GaugeMetricFamily("headwater_consumer_lag_seconds",
                                 "Age of the committed offset at the log end (interpolated).",
                                 labels=labels)
        status = GaugeMetricFamily("headwater_consumer_group_status",
                                   "Group status rank: 0 OK, 1 WARNING, 2 REWIND, 3 STALL, 4 STOP.",
                                   labels=["group"])
        for g in (self.state.lag_report or {}).get("groups", []):
            status.add_metric([g["group"]], Status(g["status"]).rank)
            for p in g["partitions"]:
                lv = [g["group"], p["topic"], str(p["partition"])]
                msgs.add_metric(lv, p["lag"])
                if p.get("lag_seconds") is not None:
                    secs.add_metric(lv, p["lag_seconds"])
        return [msgs, secs, status]


# ---- wiring --------------------------------------------------------------------------
def add_ops_routes(app: web.Application, *, settings: Settings, redis: aioredis.Redis, kafka: str,
                   holder: ModelHolder | None = None, redis_url: str | None = None,
                   registry: CollectorRegistry | None = None, period: float = 2.0,
                   lag_window: int = 10, background: bool = True) -> OpsState:
    """Mount the ops routes on ``app`` and start their samplers with the app.

    ``redis`` is a ``redis.asyncio`` client, ``kafka`` the bootstrap string, ``holder``
    serving's model holder (model and swap panels), ``registry`` the Prometheus registry
    ``/metrics`` exports (the lag gauges are added to it). Returns the shared state (also
    at ``app[OPS_KEY]``).
    """
    if not kafka:
        raise ValueError("add_ops_routes needs kafka (a bootstrap string): lag reads the broker")
    state = OpsState(settings, redis, kafka, holder=holder, redis_address=redis_url, period=period,
                     lag_window=lag_window)
    app[OPS_KEY] = state
    if registry is not None:
        registry.register(LagCollector(state))
    app.router.add_get("/", handle_dashboard)
    app.router.add_get("/v1/status", handle_status)
    app.router.add_get("/v1/lag", handle_lag)
    app.router.add_get("/v1/alerts", handle_alerts)
    app.router.add_get("/v1/timeseries", handle_timeseries)

    async def samplers(app_: web.Application):
        tasks = []
        if background:
            tasks = [asyncio.create_task(state.run("lag"), name="ops-lag"),
                     asyncio.create_task(state.run("status"), name="ops-status")]
        yield
        state.stopping = True
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await asyncio.to_thread(state.close_monitor)

    app.cleanup_ctx.append(samplers)
    return state
