"""The serving HTTP application: scoring, model admin, health, readiness, metrics.

``create_app(settings, ctx)`` builds the aiohttp application from an :class:`AppContext`
(holder, scorer, Redis client, metrics registry); ``run_serving`` wires the real parts
(model store, Redis, the ``model-updates`` watcher, the status heartbeat) and runs it.
The operator routes (``/``, ``/v1/lag``, ``/v1/status``, ``/v1/alerts``) come from
:func:`serving.ops.add_ops_routes` when that module is present; it receives the same
context.

Every handler runs under one middleware: an unexpected exception becomes a logged 500
carrying an ``error_id`` that is also in the log line, never a stack trace to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import importlib.util
import logging
import os
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from core.redis_client import RoundTrips, connect_async, is_cluster
from core.settings import Settings
from learner.store import CheckpointError, manifest_kind
from serving.balance import BalancedAcceptor, board_from_env
from serving.holder import HolderError, ModelHolder
from serving.impressions import ImpressionLog, impression_record, kafka_sender
from serving.metrics import CONTENT_TYPE_LATEST, ServingMetrics
from serving.models import BaselineModel, normalize_version
from serving.scoring import RequestError, Scorer, parse_score_requests
from serving.workers import LISTEN_FD_ENV, READY_FD_ENV

__all__ = ["AppContext", "build_context", "create_app", "run_serving"]

log = logging.getLogger(__name__)

ADMIN_DISABLED = "admin endpoints disabled: set HEADWATER_ADMIN_TOKEN"


@dataclass
class AppContext:
    """Everything the handlers (ours and the ops routes) share.

    ``redis`` is a ``redis.asyncio`` client (bytes responses); ``registry`` the
    Prometheus registry ``/metrics`` exports (ops metrics may register on it too).
    """

    settings: Settings
    holder: ModelHolder
    scorer: Scorer
    redis: Any
    metrics: ServingMetrics
    registry: CollectorRegistry
    kafka: str | None = None
    redis_url: str | None = None
    watcher: Any = None
    baseline: Any = None
    started_at: float = field(default_factory=time.time)
    last_error: str | None = None
    #: set when this process stops: responses carry ``Connection: close``
    draining: bool = False
    #: where every scoring answer is logged (``serving.impressions``); None: not logged
    impressions: Any = None
    #: a ``--workers`` worker's accept side (``serving.balance``); None: a site of its own
    acceptor: Any = None

    def status_fields(self) -> dict[str, Any]:
        """The serving heartbeat's own fields (see :mod:`core.health`)."""
        cur = self.holder.current
        cache = getattr(self.scorer.store, "read_cache", None)
        traced = self.holder.loader.traced
        errors = [
            e
            for e in (
                self.holder.last_error,
                self.last_error,
                getattr(self.watcher, "last_error", None),
            )
            if e
        ]
        return {
            "model": self.holder.store.model,
            "model_version": cur.version if cur else None,
            "model_created_at": cur.created_at if cur else None,
            "pinned": self.holder.pinned,
            "requests_total": self.metrics.requests_total,
            "swaps": self.holder.swaps,
            "http": f"http://{self.settings.bind_host}:{self.settings.http_port}",
            "last_error": errors[0] if errors else None,
            # hits, misses, tracking state (live / connecting / refused), invalidations
            "feature_cache": cache.stats() if cache is not None else None,
            # whether the serving version runs the traced forward; graphs traced, failed
            # traces, versions refused it for a differing warm-up score
            "traced_forward": traced.stats(cur) if traced is not None else None,
            # requests per coalesced feature read and per forward pass since the start
            "batching": self.scorer.batching_stats(),
            # feature reads tried again after a lost Redis connection (a restart), since
            # the start: each within the request's own deadline
            "redis_retries": self.scorer.redis_retries,
            # a --workers worker: connections accepted, left to a less loaded worker, and
            # accepted only when the wait for it ran out; every worker's open connections
            "accept": self.acceptor.stats() if self.acceptor is not None else None,
        }


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own errors (404, 405, 413 from client_max_size) as JSON too.
        resp = _json_error(exc.status, exc.reason, path=request.path)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except asyncio.CancelledError:
        raise
    except Exception:
        error_id = uuid.uuid4().hex[:12]
        log.exception("internal error %s on %s %s", error_id, request.method, request.path)
        ctx: AppContext | None = request.app.get(CTX_KEY)
        if ctx is not None:
            ctx.last_error = f"internal error {error_id} on {request.method} {request.path}"
        return _json_error(500, "internal error; the server log has the details", error_id=error_id)


CTX_KEY: web.AppKey[AppContext] = web.AppKey("headwater_ctx", AppContext)


def _ctx(request: web.Request) -> AppContext:
    return request.app[CTX_KEY]


# ---- scoring ---------------------------------------------------------------------------
def _log_impression(ctx: AppContext, req, scored, version: str) -> str:
    """A new request id; the answer goes to the impressions log (never waited for)."""
    rid = uuid.uuid4().hex
    if ctx.impressions is not None and req.candidates:
        # built on the logging thread: the arrays are the scored ones, never changed after
        ctx.impressions.offer(functools.partial(
            impression_record, rid, req.user_id, req.candidates, scored.scores,
            scored.categorical, scored.dense, scored.ts, version, ctx.scorer.schema_hash))
    return rid


def _scores_response(doc: dict[str, Any]) -> web.Response:
    """A scoring answer as JSON, numpy scores written by orjson straight from the array
    (each the shortest text that reads back as the same float64)."""
    return web.Response(body=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
                        content_type="application/json", charset="utf-8")


async def score(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    t0 = time.perf_counter()
    code, n = 500, None
    try:
        limit = ctx.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            code = 413
            return _json_error(
                413,
                f"body has {request.content_length} bytes; at most {limit} "
                "are accepted (HEADWATER_MAX_BODY_BYTES)",
                field="body",
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            code = 413
            return _json_error(
                413, f"body is larger than {limit} bytes (HEADWATER_MAX_BODY_BYTES)", field="body"
            )
        try:
            req = parse_score_requests(body, ctx.settings.max_candidates)
        except RequestError as exc:
            code = exc.status
            return web.json_response(exc.to_json(), status=exc.status)
        batch = req if isinstance(req, list) else None
        n = sum(len(r.candidates) for r in batch) if batch is not None else len(req.candidates)
        # read once: this request scores on this model to the end
        served = ctx.holder.current or ctx.baseline
        if served is None:
            code = 503
            return _json_error(
                503,
                "no model is loaded yet: the learner has not published a "
                "version that passed the checks (see GET /v1/models), and the "
                "popularity baseline is off (HEADWATER_SERVE_BASELINE)",
            )
        if batch is not None:
            # every request of the batch on the same model, features read concurrently
            all_scored = await asyncio.gather(*(ctx.scorer.score_rows(served, r) for r in batch))
            ids = [_log_impression(ctx, r, sc, served.version) for r, sc in zip(batch, all_scored, strict=True)]
            code = 200
            return _scores_response({
                "model_version": served.version,
                "results": [
                    {"user_id": r.user_id, "request_id": rid,
                     "scores": {str(c): float(v) for c, v in zip(r.candidates, sc.scores, strict=True)}}
                    for r, sc, rid in zip(batch, all_scored, ids, strict=True)
                ],
            })
        scored = await ctx.scorer.score_rows(served, req)
        rid = _log_impression(ctx, req, scored, served.version)
        code = 200
        return _scores_response({"model_version": served.version, "request_id": rid,
                                 "scores": scored.scores})
    finally:
        ctx.metrics.observe_request(code, time.perf_counter() - t0, n)


# ---- health ------------------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    return web.json_response({"alive": True, "uptime_s": round(time.time() - ctx.started_at, 1)})


async def readyz(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    cur = ctx.holder.current
    redis_ok, redis_error = True, None
    try:
        await asyncio.wait_for(ctx.redis.ping(), timeout=1.0)
    except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
        redis_ok, redis_error = False, f"{type(exc).__name__}: {exc}"
    reasons = []
    if cur is None and ctx.baseline is None:
        reasons.append("no model AVAILABLE yet")
    if cur is None and ctx.baseline is not None:
        cur = ctx.baseline
    if not redis_ok:
        reasons.append(f"redis unreachable ({redis_error})")
    ready = not reasons
    return web.json_response(
        {
            "ready": ready,
            "model_version": cur.version if cur else None,
            "redis": redis_ok,
            "reasons": reasons,
        },
        status=200 if ready else 503,
    )


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The HTTP API's OpenAPI 3.1 document (``serving/openapi.yaml``)."""
    return yaml.safe_load((Path(__file__).resolve().parent / "openapi.yaml").read_text())


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def metrics(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    return web.Response(body=ctx.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---- models --------------------------------------------------------------------------------
def _admin_check(request: web.Request) -> web.Response | None:
    token = _ctx(request).settings.admin_token_value()
    if not token:
        return _json_error(403, ADMIN_DISABLED)
    auth = request.headers.get("Authorization", "")
    given = (
        auth[7:].strip()
        if auth[:7].lower() == "bearer "
        else request.headers.get("X-Admin-Token", "")
    )
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        resp = _json_error(
            401,
            "admin token missing or wrong: send 'Authorization: Bearer <token>' or 'X-Admin-Token'",
        )
        resp.headers["WWW-Authenticate"] = 'Bearer realm="headwater-admin"'
        return resp
    return None


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(_ctx(request).holder.listing())


async def get_model(request: web.Request) -> web.Response:
    """One version's metadata: its state in this server and its manifest (with metrics)."""
    ctx = _ctx(request)
    raw = request.match_info["version"]
    try:
        version = normalize_version(raw)
    except HolderError:
        return _json_error(400, f"version {raw!r} is not a version number", field="version")
    listing = ctx.holder.listing()
    entry = next((m for m in listing["models"] if m.get("version") == version), None)
    try:
        manifest = await asyncio.to_thread(ctx.holder.store.manifest, version)
    except CheckpointError as exc:
        if entry is None:
            return _json_error(404, f"no version {version} of model {listing['model']}: {exc}")
        manifest = None
    return web.json_response({
        "model": listing["model"],
        "version": version,
        "serving": listing["serving"] == version,
        "pinned": listing["pinned"] == version,
        "kind": manifest_kind(manifest) if manifest is not None else None,
        "base": manifest.get("base") if manifest is not None else None,
        "state": entry,
        "manifest": manifest,
    })


async def _admin_action(request: web.Request, action) -> web.Response:
    denied = _admin_check(request)
    if denied is not None:
        return denied
    ctx = _ctx(request)
    try:
        await action(ctx.holder)
    except HolderError as exc:
        return _json_error(exc.status, str(exc))
    cur = ctx.holder.current
    log.info("admin %s %s: serving %s", request.method, request.path, cur.version if cur else None)
    return web.json_response({**ctx.holder.listing(), "ok": True})


async def pin_model(request: web.Request) -> web.Response:
    version = request.match_info["version"]
    return await _admin_action(request, lambda h: h.submit(h.pin, version))


async def unpin_model(request: web.Request) -> web.Response:
    return await _admin_action(request, lambda h: h.submit(h.unpin))


async def rollback_model(request: web.Request) -> web.Response:
    return await _admin_action(request, lambda h: h.submit(h.rollback))


_WORKER = str(os.getpid())


async def _on_response(request: web.Request, response: web.StreamResponse) -> None:
    """Name the serving process that answered; ``Connection: close`` while draining."""
    response.headers["X-Headwater-Worker"] = _WORKER
    if request.app[CTX_KEY].draining:
        # aiohttp has already chosen the Connection header when this hook runs: say
        # "close" ourselves, or the client would reuse a connection we then close
        response.force_close()
        response.headers["Connection"] = "close"


def create_app(settings: Settings, ctx: AppContext, *, ops: bool | None = None) -> web.Application:
    """The serving application: our routes, plus the operator routes of ``serving.ops``.

    ``ops`` None mounts the operator routes when ``serving.ops`` exists and the context
    knows a broker (``ctx.kafka``: lag needs one); True requires them, False leaves them out.
    """
    # Headroom over max_body_bytes so our own check answers first, with a clear message.
    app = web.Application(middlewares=[_errors], client_max_size=settings.max_body_bytes + 1)
    app[CTX_KEY] = ctx
    app.on_response_prepare.append(_on_response)
    app.router.add_post("/v1/score", score)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{version}", get_model)
    app.router.add_post("/v1/models/unpin", unpin_model)
    app.router.add_post("/v1/models/rollback", rollback_model)
    app.router.add_post("/v1/models/{version}/pin", pin_model)
    if ops is None:
        ops = bool(ctx.kafka) and importlib.util.find_spec("serving.ops") is not None
        if not ops:
            log.info("operator routes (/, /v1/lag, /v1/status, /v1/alerts) not mounted: no broker")
    if ops:
        from serving.ops import add_ops_routes

        add_ops_routes(app, settings=ctx.settings, redis=ctx.redis, kafka=ctx.kafka, holder=ctx.holder,
                       redis_url=ctx.redis_url, registry=ctx.registry)
    return app


# ---- wiring ----------------------------------------------------------------------------------
def default_row_builder(settings: Settings):
    """The row builder the worker uses (``features.defaults.row_builder``), so schemas agree."""
    from features.defaults import row_builder

    return row_builder(settings)


def _item_content(settings: Settings, redis_url: str | None):
    """Item content for EM3 models (``HEADWATER_EM3_QUERIES`` > 0), else ``None``."""
    url = redis_url or settings.redis
    if not settings.em3_queries or not url:
        return None
    from streams.item_content import item_content_table

    return item_content_table(settings, url)


def build_context(
    settings: Settings,
    redis_client: Any,
    *,
    kafka: str | None = None,
    redis_url: str | None = None,
    builder: Any = None,
    registry: CollectorRegistry | None = None,
    quality_margin: float | None = None,
    keep_loaded: int = 2,
    inference_threads: int | None = None,
) -> AppContext:
    """Holder, scorer and metrics over a model store and an async Redis client."""
    from features.store import OnlineStore
    from learner.model_stores import open_model_store

    registry = registry if registry is not None else CollectorRegistry()
    metrics_ = ServingMetrics(registry)
    builder = builder if builder is not None else default_row_builder(settings)
    store = open_model_store(settings)
    holder = ModelHolder(
        store,
        builder.schema,
        metrics=metrics_,
        keep_loaded=keep_loaded,
        quality_margin=quality_margin,
        item_content=_item_content(settings, redis_url),
        traced_forward=settings.serve_traced_forward,
    )
    transport = None
    if redis_url and settings.serve_redis_round_trips and not is_cluster(redis_client):
        transport = RoundTrips.for_url(redis_url, callbacks=redis_client.response_callbacks,
                                       tracking=settings.serve_feature_tracking)
    online = OnlineStore(redis_client, transport, partitions=settings.partitions,
                         counters=builder.config.counters, registry=registry,
                         read_cache_seconds=settings.serve_feature_cache_seconds,
                         seq_len=settings.seq_len)
    threads = settings.serve_inference_threads if inference_threads is None else inference_threads
    executor = (
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="inference") if threads else None
    )
    scorer = Scorer(online, builder, executor,
                    redis_retry_seconds=settings.score_redis_retry_seconds,
                    batch_rows=settings.serve_batch_rows, read_rows=settings.serve_read_rows)
    baseline = BaselineModel.for_schema(builder.schema.dense) if settings.serve_baseline else None
    return AppContext(
        settings, holder, scorer, redis_client, metrics_, registry, kafka=kafka,
        redis_url=redis_url, baseline=baseline,
    )


async def _heartbeat(ctx: AppContext, stop: asyncio.Event) -> None:
    from core.health import PERIOD_S, make_status, publish_async

    while not stop.is_set():
        try:
            await publish_async(
                ctx.redis, make_status("serving", ctx.started_at, **ctx.status_fields())
            )
        except Exception as exc:  # noqa: BLE001 - Redis may be down; /readyz says so
            log.warning("serving heartbeat failed: %r", exc)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), PERIOD_S)


async def serve(
    settings: Settings,
    kafka: str | None,
    redis_url: str,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    rescan_seconds: float = 5.0,
    **context_kwargs: Any,
) -> None:
    """Run serving until ``stop`` is set (the body of :func:`run_serving`, reusable in tests)."""
    import torch

    from serving.watcher import ModelWatcher

    torch.set_num_threads(settings.torch_threads)
    client = connect_async(redis_url, decode_responses=False)
    ctx = build_context(settings, client, kafka=kafka, redis_url=redis_url, **context_kwargs)
    served = await ctx.holder.submit(ctx.holder.start)  # newest good (or pinned) version, before the topic
    log.info("serving %s version %s at start", settings.model_name, served)
    ctx.watcher = ModelWatcher(
        kafka,
        settings.topics["model-updates"],
        settings.model_name,
        functools.partial(ctx.holder.submit, ctx.holder.offer),
        functools.partial(ctx.holder.submit, ctx.holder.rescan),
        rescan_seconds=rescan_seconds,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )
    if kafka and settings.impression_log:
        ctx.impressions = ImpressionLog(kafka_sender(kafka, settings.topics["impressions"],
                                                     settings.impression_linger_ms),
                                        settings.partitions, settings.impression_buffer,
                                        ctx.registry,
                                        # the thread wakes once per linger: each wake sends
                                        # what the producer would have held back anyway
                                        period=max(settings.impression_linger_ms, 10) / 1000)
        ctx.impressions.start()
    app = create_app(settings, ctx)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    listen_fd = os.environ.get(LISTEN_FD_ENV)
    board = board_from_env()
    site: web.BaseSite | None = None
    if listen_fd and board is not None:  # a worker of `headwater serve --workers N`
        server = runner.server
        assert server is not None
        ctx.acceptor = BalancedAcceptor(
            socket.socket(fileno=int(listen_fd)), server, lambda: len(server.connections),
            *board, max_defer=settings.serve_accept_defer_seconds)
        ctx.acceptor.start()
    elif listen_fd:  # an inherited socket without a supervisor's board
        site = web.SockSite(runner, socket.socket(fileno=int(listen_fd)))
    else:
        site = web.TCPSite(runner, settings.bind_host, settings.http_port, reuse_address=True)
    if site is not None:
        await site.start()
    ctx.watcher.start()
    beat = asyncio.create_task(_heartbeat(ctx, stop))
    log.info("serving listens on http://%s:%s", settings.bind_host, settings.http_port)
    _say_ready()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await _drain(ctx, runner, site, settings.serve_drain_seconds)
        await ctx.watcher.stop()
        await beat
        await runner.cleanup()
        if board is not None:  # after the last request that could show it (/v1/status)
            board[0].close()
        if ctx.impressions is not None:
            await asyncio.to_thread(ctx.impressions.close)
        ctx.holder.close()
        if ctx.scorer.executor is not None:
            ctx.scorer.executor.shutdown(wait=False, cancel_futures=True)
        if ctx.scorer.store.transport is not None:
            ctx.scorer.store.transport.close()
        await client.aclose()


def _say_ready() -> None:
    """Tell the supervisor (``--workers``) this worker listens and has a ranker."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd:
        with contextlib.suppress(OSError):
            os.write(int(fd), b"1")
            os.close(int(fd))


async def _drain(ctx: AppContext, runner: web.AppRunner, site: web.BaseSite | None,
                 seconds: float) -> None:
    """Stop accepting, then answer open connections with ``Connection: close`` for at
    most ``seconds`` (until the clients have gone): a client in a request loop is never
    cut off mid-request, and queued connections wait for the other workers."""
    ctx.draining = True
    log.info("draining: %d connections open", len(runner.server.connections) if runner.server else -1)
    # Stop accepting first, then let the connections already accepted become transports
    # (asyncio attaches each in a task of its own, on the next loop iteration), and only
    # then close the server: a connection accepted just before close() would otherwise
    # fail to attach and be dropped with a reset (a closed asyncio.Server refuses it).
    if ctx.acceptor is not None:
        await ctx.acceptor.stop()  # waits for the accepted connections to attach
    if site is not None:
        loop = asyncio.get_running_loop()
        srv = getattr(site, "_server", None)  # the site's asyncio.Server
        for sock in srv.sockets if srv is not None else ():
            loop.remove_reader(sock.fileno())
        for _ in range(3):
            await asyncio.sleep(0)
        await site.stop()
    server = runner.server
    deadline = time.monotonic() + seconds
    while server is not None and server.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    log.info("drained: %d connections left open after %.1fs",
             len(server.connections) if server is not None else 0,
             seconds - max(0.0, deadline - time.monotonic()))


def run_serving(settings: Settings, kafka: str | None, redis_url: str) -> int:
    """``headwater serve``: serve until SIGTERM or SIGINT; return the exit code.

    With ``serve_workers`` > 1 (``--workers N``) this process supervises N serving
    processes on one shared socket instead (:mod:`serving.workers`).
    """
    if settings.serve_workers > 1 and not os.environ.get(LISTEN_FD_ENV):
        from serving.workers import run_workers

        return run_workers(settings)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    )
    # What the imports made (torch, numpy, aiohttp, the product: ~224k objects) lives as
    # long as the process: frozen out of the collector's reach, a full collection walks
    # only what came after (docs/decisions.md, "Startup objects frozen out of the GC")
    gc.collect()
    gc.freeze()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, kafka, redis_url, stop)

    asyncio.run(main())
    return 0
