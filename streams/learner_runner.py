"""``headwater learner``: the learner loop as a service — metrics endpoint, heartbeat, signals.

Training runs in the main thread (torch releases the GIL in its kernels); a daemon
thread publishes the heartbeat, and Prometheus metrics are served on the learner port.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time

import redis
from prometheus_client import CollectorRegistry, start_http_server

from core.health import PERIOD_S, make_status, publish_sync
from core.redis_client import connect
from core.settings import Settings
from core.signals import on_signals
from learner.kafka_loop import LearnerLoop
from learner.model_stores import open_model_store
from learner.trainer import TrainerSettings

log = logging.getLogger(__name__)


def _heartbeat(client: redis.Redis, loop: LearnerLoop, started: float, stop: threading.Event) -> None:
    while not stop.wait(PERIOD_S):
        try:
            s = loop.service.status()
            doc = make_status(
                "learner", started, model_version=s["version"], rows_trained=s["rows_trained"],
                rows_dropped=s["rows_dropped"], prequential_auc=s["auc"],
                prequential_logloss=s["logloss"], rolling_auc=s["rolling_auc"],
                served_auc=s["served_auc"], served_rolling_auc=s["served_rolling_auc"],
                pending_rows=s["pending_rows"],
                drift_total=s["drift_total"], backlog_rows=s["backlog"],
                publications=s["publications"], last_error=s["last_error"],
                rank=getattr(getattr(loop, "group", None), "rank", None))
            publish_sync(client, doc)
        except Exception as exc:  # noqa: BLE001 - a Redis outage must not stop training
            log.warning("learner heartbeat failed: %s", exc)


@dataclasses.dataclass
class ServiceTrainerSettings(TrainerSettings):
    """Tracks cold-item AUC on ``item_id`` when the feature schema has that field; with
    EM3 fields, attaches the items' content read from ``content_redis``."""

    content_redis: str | None = None
    settings: Settings | None = None

    def build(self, schema_json: str):
        from learner.batch import schema_fields

        categorical, _ = schema_fields(schema_json)
        item = "item_id" if "item_id" in categorical else None
        trainer = super(ServiceTrainerSettings, dataclasses.replace(self, item_field=item)).build(
            schema_json)
        em3 = getattr(trainer.learner.model, "em3", None)
        if em3 is not None:
            if self.content_redis is None or self.settings is None:
                raise ValueError("EM3 fields need the items' content: no Redis given")
            from streams.item_content import item_content_table

            em3.attach(item_content_table(self.settings, self.content_redis))
        return trainer


def trainer_settings(settings: Settings, redis_url: str | None = None) -> ServiceTrainerSettings:
    """The trainer recipe ``headwater learner`` runs (benchmarks measure this one too);
    ``redis_url``: where EM3 fields read item content (``HEADWATER_EM3_QUERIES``)."""
    from streams.item_content import em3_spec

    return ServiceTrainerSettings(
        em3=em3_spec(settings), content_redis=redis_url, settings=settings,
        kind=settings.model_kind, preset=settings.model_preset,
        # River's ROCAUC is thresholded: 10 thresholds read ~0.5 while scores sit in a
        # narrow band early on; 50 cost ~4 % of a step and track the exact AUC closely.
        n_thresholds=50,
        downsample={"backlog_threshold": settings.downsample_backlog_rows or None,
                    "negative_rate": settings.downsample_negative_rate},
        num_threads=settings.torch_threads,
        embedding={"kind": "hashed", "buckets": settings.embedding_buckets,
                   "dim": settings.embedding_dim},
        reference_rows=settings.learner_step_rows,
        dense_norm=settings.model_wide, wide=settings.model_wide,
        served_lag={"delay": settings.served_lag_delay_seconds,
                    "sample": settings.served_lag_sample})


def run_learner(settings: Settings, bootstrap: str, redis_url: str) -> int:
    import torch

    from streams.topics import ensure_topics

    torch.set_num_threads(settings.torch_threads)
    ensure_topics(settings, bootstrap, timeout=120)
    registry = CollectorRegistry()
    member = settings.learner_world_size > 1
    extra = {}
    loop_cls = LearnerLoop
    if member:
        from learner.distributed import DistributedLearnerLoop, GroupConfig

        loop_cls = DistributedLearnerLoop
        extra["group"] = GroupConfig(
            settings.learner_rank, settings.learner_world_size, settings.learner_master,
            settings.learner_generation, settings.learner_store_hosted)
    loop = loop_cls(
        bootstrap, settings.topics, open_model_store(settings), settings.model_name,
        settings=trainer_settings(settings, redis_url),
        lag_group=f"headwater-learner-{settings.model_name}",
        max_staleness_seconds=settings.learner_max_staleness_seconds or None,
        step_rows=settings.learner_step_rows,
        step_wait_seconds=settings.learner_step_wait_seconds,
        publish_every_seconds=settings.publish_every_seconds,
        publish_every_rows=settings.publish_every_rows,
        delta_every_seconds=settings.delta_every_seconds,
        keep_versions=settings.keep_versions,
        registry=registry,
        **extra,
    )
    if not member or settings.learner_rank == 0:  # one metrics endpoint per group
        start_http_server(settings.learner_port, addr=settings.bind_host, registry=registry)
    client = connect(redis_url, socket_timeout=5)
    stop = threading.Event()
    started = time.time()
    publish_sync(client, make_status("learner", started, model_version=loop.service.version,
                                     rows_trained=0))
    threading.Thread(target=_heartbeat, args=(client, loop, started, stop), daemon=True).start()

    def _on_signal(signum: int) -> None:
        log.info("learner: signal %d, publishing and stopping", signum)
        loop.stop()

    on_signals({signal.SIGTERM: _on_signal, signal.SIGINT: _on_signal})
    try:
        loop.run()
    finally:
        stop.set()
    if member:
        exit_now(0)
    return 0


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown. After a clean stop everything is published
    and closed; the final garbage collection over torch's objects took 5-8 s here, past
    the time a supervisor (or ``headwater down``) gives a stopping group."""
    import os
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
