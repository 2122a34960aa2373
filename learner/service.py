"""The learner service: payloads in, test-then-train, periodic publication, metrics.

I/O stays behind seams: bytes come in through :meth:`LearnerService.process` (a Kafka
loop, a test, a benchmark), checkpoints go out through a :class:`~learner.store.ModelStore`
and an ``on_publish`` callback (the Kafka loop sends the manifest to ``model-updates``).
Every method is synchronous and blocking (torch steps): call it from a thread or its
own process, or use the ``a*`` wrappers, never directly on an event loop.

Restart contract: a new service over the same store resumes from the latest good
checkpoint — weights, Adam state, watermarks, counters and cumulative metrics — so
rows published before the kill are neither skipped nor trained twice.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from learner.batch import TrainBatch, decode_batch
from learner.protocol import Publishable
from learner.store import CheckpointError, ModelStore, compute_delta
from learner.trainer import PrequentialTrainer, SchemaMismatchError, StepResult

__all__ = ["LearnerService", "TrainerFactory"]

log = logging.getLogger(__name__)

TrainerFactory = Callable[[str], PrequentialTrainer]
"""Builds a fresh trainer (model included) for a feature-schema JSON."""


def _finite(x: float | None) -> float | None:
    return None if x is None or x != x else x


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows_trained = Counter(
            "headwater_learner_rows_trained", "Rows the learner trained on.", registry=registry
        )
        self.rows_dropped = Counter(
            "headwater_learner_rows_dropped",
            "Rows not trained on, by reason (duplicate, downsampled, schema; "
            "invalid_batch counts undecodable messages).",
            ["reason"],
            registry=registry,
        )
        self.auc = Gauge(
            "headwater_learner_prequential_auc",
            "Cumulative test-then-train ROC AUC.",
            registry=registry,
        )
        self.served_auc = Gauge(
            "headwater_learner_served_auc",
            "Cumulative AUC of the published snapshot serving runs, on rows it had not seen.",
            registry=registry,
        )
        self.logloss = Gauge(
            "headwater_learner_prequential_logloss",
            "Cumulative test-then-train log-loss.",
            registry=registry,
        )
        self.backlog = Gauge(
            "headwater_learner_backlog_rows", "Rows waiting on train-batches.", registry=registry
        )
        self.drift = Counter(
            "headwater_learner_drift",
            "ADWIN drift detections on the per-row loss.",
            registry=registry,
        )
        self.publications = Counter(
            "headwater_learner_publications", "Model versions published.", registry=registry
        )
        self.publish_seconds = Histogram(
            "headwater_learner_publish_seconds",
            "Time to publish a version.",
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.delta_seconds = Histogram(
            "headwater_learner_delta_seconds",
            "Time to compute and publish a delta (changes since the last full checkpoint).",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.version = Gauge(
            "headwater_model_version",
            "Latest published model version.",
            ["model"],
            registry=registry,
        )


class LearnerService:
    """Decode -> dedup -> score -> train, and publish every N seconds or rows.

    ``on_publish(manifest_with_path)`` runs after each publication (errors are logged,
    never lost silently: they land in ``status()["last_error"]``).
    ``checkpoint_optimizer=False`` leaves Adam's moments out of ``model.pt`` (about a
    third of the bytes); a restart then resumes with fresh moments.
    ``resume=False`` ignores the store's checkpoints (benchmarks, fresh experiments).
    ``delta_every_seconds`` (``None``: off) publishes a **delta** that often between full
    checkpoints: the weights that changed since the last full one (Monolith-style
    incremental publication, :func:`learner.store.compute_delta`), so serving is fresh
    without moving the whole model; full checkpoints still follow ``publish_every_*``.

    Steps of a sane size at any event rate: messages accumulate until they hold
    ``step_rows`` rows or the oldest has waited ``step_wait_seconds`` — with deltas on,
    or until a delta is due, so each delta carries every row received before it (checked on every
    message and by :meth:`tick`, which a consume loop calls when a poll comes back
    empty); then all of them are scored and trained as one optimizer step. A message's
    consumer position is recorded only once its rows are trained, so a publication
    never covers rows still waiting, and a restart re-reads them.
    """

    def __init__(
        self,
        store: ModelStore,
        trainer_factory: TrainerFactory,
        publish_every_seconds: float | None = 5.0,
        publish_every_rows: int | None = None,
        on_publish: Callable[[dict[str, Any]], None] | None = None,
        registry: CollectorRegistry | None = None,
        checkpoint_optimizer: bool = True,
        clock: Callable[[], float] = time.monotonic,
        resume: bool = True,
        step_rows: int = 1,
        step_wait_seconds: float = 0.0,
        delta_every_seconds: float | None = None,
    ) -> None:
        self.store = store
        self.delta_every_seconds = delta_every_seconds or None
        # (version, sha256, weights) of the last full checkpoint, which deltas are computed
        # against (the sha256 pins it: the store's version of that number must be this one)
        self._base: tuple[str, str, dict[str, Any]] | None = None
        self.deltas_refused = 0
        self.rows_since_delta = 0
        self.deltas = 0
        self.trainer_factory = trainer_factory
        self.publish_every_seconds = publish_every_seconds
        self.publish_every_rows = publish_every_rows
        self.on_publish = on_publish
        self.checkpoint_optimizer = checkpoint_optimizer
        self.clock = clock
        self.metrics = _Metrics(registry if registry is not None else CollectorRegistry())
        self.trainer: PrequentialTrainer | None = None
        self.version: str | None = None
        self.consumer_positions: dict[str, int] = {}
        self.last_error: str | None = None
        self.last_drift_at: float | None = None
        self.invalid_batches = 0
        self.publications = 0
        self.rows_since_publish = 0
        self._started = clock()
        self._last_publish = clock()
        self._last_delta = self._last_publish
        self.step_rows = max(1, int(step_rows))
        self.step_wait_seconds = float(step_wait_seconds)
        self._pending: list[tuple[TrainBatch, tuple[str, int, int] | None]] = []
        self._pending_rows = 0
        self.pending_since = 0.0
        self._backlog = 0
        self.last_message_rows = 0
        # what trains the waiting rows (default: the trainer's step_many); a data-parallel
        # member sets a collective step here (learner.distributed)
        self.stepper: Callable[..., StepResult] | None = None
        self._lock = threading.RLock()
        if resume:
            self._resume()

    # ---- lifecycle ---------------------------------------------------------------
    def _resume(self) -> None:
        version = self.store.latest_good()
        if version is None:
            return
        ck = self.store.load(version)
        state = ck.state
        schema_json = state["trainer"]["schema_json"]
        trainer = self.trainer_factory(schema_json)
        try:
            trainer.load_state(state["trainer"])
            if isinstance(trainer.learner, Publishable):
                trainer.learner.load_state_dict(
                    {"model": state["model"], "optimizer": state.get("optimizer")}
                )
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"{self.store.model} version {version}: the trainer factory builds a model that does "
                f"not match the checkpoint ({exc}); publish under a new model name to change it"
            ) from None
        trainer.clock = self.clock
        if trainer.served is not None and isinstance(trainer.learner, Publishable):
            # what serving runs after a restart: the version we resume from
            trainer.served.publish(trainer.learner.serving_model(), self.clock())
        self.trainer = trainer
        self.version = version
        if self.delta_every_seconds:
            self._base = (version, ck.manifest["sha256"], state["model"])
        self.consumer_positions = {
            str(k): int(v) for k, v in state.get("consumer_positions", {}).items()
        }
        self.metrics.version.labels(self.store.model).set(int(version))
        self._update_gauges()
        log.info(
            "learner resumed %s version %s at %s",
            self.store.model,
            version,
            trainer.watermarks_json(),
        )

    # ---- the work ------------------------------------------------------------------
    def process(
        self,
        payload: bytes,
        backlog: int | None = None,
        position: tuple[str, int, int] | None = None,
    ) -> StepResult | None:
        """Handle one train-batch message; return what the step did when one ran.

        ``backlog`` (rows still waiting) drives negative down-sampling; ``position``
        ``(topic, partition, next_offset)`` of the *train-batches* message is stored in
        checkpoints (once the message's rows are trained) so a Kafka loop can seek there
        on restart. Returns ``None`` when the message was refused or is waiting for more
        rows (see the class docstring), else the :class:`StepResult` of the step it ran.
        """
        with self._lock:
            if backlog is not None:
                self._backlog = int(backlog)
                self.metrics.backlog.set(backlog)
            try:
                batch = decode_batch(payload)
            except ValueError as exc:
                self.invalid_batches += 1
                self.metrics.rows_dropped.labels("invalid_batch").inc()
                self.last_error = f"invalid train batch: {exc}"
                log.warning(self.last_error)
                if position is not None and not self._pending:
                    self._record_position(position)
                return None
            self._ensure_trainer(batch)
            try:
                self.trainer.check_schema(batch)
            except SchemaMismatchError as exc:
                self.metrics.rows_dropped.labels("schema").inc(len(batch))
                self.last_error = str(exc)
                log.warning(self.last_error)
                if position is not None and not self._pending:
                    self._record_position(position)
                return None
            self.last_message_rows = len(batch)
            if not self._pending:
                self.pending_since = self.clock()
            self._pending.append((batch, position))
            self._pending_rows += len(batch)
            if self._pending_rows >= self.step_rows or self._waited_enough():
                return self.train_pending()
            return None

    def skip_stale(self, payload: bytes, position: tuple[str, int, int] | None = None) -> int:
        """Skip a message that waited longer than the staleness bound: its rows are never
        trained (counted as ``rows_dropped{reason="stale"}``), so a learner that fell far
        behind catches up with the stream instead of serving an ever older model. Rows
        waiting for a step are trained first, so positions stay in order."""
        with self._lock:
            try:
                batch = decode_batch(payload)
            except ValueError:
                self.process(payload, position=position)  # reported as an invalid batch
                return 0
            self._ensure_trainer(batch)
            if self._pending:
                self.train_pending()
            try:
                n = self.trainer.skip(batch)
            except SchemaMismatchError as exc:
                self.last_error = str(exc)
                n = 0
            if position is not None:
                self._record_position(position)
            if n:
                self.metrics.rows_dropped.labels("stale").inc(n)
            return n

    def _ensure_trainer(self, batch: TrainBatch) -> None:
        """Build the trainer for the first batch's schema (on the service's clock)."""
        if self.trainer is None:
            self.trainer = self.trainer_factory(batch.schema_json)
            self.trainer.clock = self.clock

    def tick(self) -> StepResult | None:
        """Train waiting rows whose deadline has passed (call when a poll is empty)."""
        with self._lock:
            if self._pending and self._waited_enough():
                return self.train_pending()
            return None

    def flush(self) -> StepResult | None:
        """Train every waiting row now (before a publication on shutdown)."""
        with self._lock:
            return self.train_pending() if self._pending else None

    @property
    def pending_rows(self) -> int:
        """Rows received but not trained yet (waiting to fill a step)."""
        return self._pending_rows

    def _waited_enough(self) -> bool:
        now = self.clock()
        if now - self.pending_since >= self.step_wait_seconds:
            return True
        # Freshness: with deltas on, what waits is trained just before each delta is due,
        # so a row waits for one delta period at most, not a step wait and then a period.
        # (An infinite step wait means "never step alone": a data-parallel member, whose
        # group steps on rank 0's delta_period_over instead.)
        return math.isfinite(self.step_wait_seconds) and self.delta_period_over()

    def delta_period_over(self) -> bool:
        """True when deltas are on, there is a base, and the delta period ran out (a delta
        is due as soon as rows are trained: :meth:`delta_due`)."""
        return (
            self.delta_every_seconds is not None
            and self._base is not None
            and self.clock() - self._last_delta >= self.delta_every_seconds
        )

    def _record_position(self, position: tuple[str, int, int]) -> None:
        self.consumer_positions[f"{position[0]}:{position[1]}"] = int(position[2])

    def train_pending(self, backlog: int | None = None) -> StepResult:
        """Train the accumulated messages as one step now (``backlog``: the rows waiting,
        when the caller knows a newer figure than the last message's)."""
        assert self.trainer is not None
        if backlog is not None:
            self._backlog = int(backlog)
        pending, self._pending, self._pending_rows = self._pending, [], 0
        step = self.stepper or self.trainer.step_many
        result = step([b for b, _ in pending], backlog=self._backlog)
        for _batch, position in pending:
            if position is not None:
                self._record_position(position)
        self.account(result)
        return result

    def account(self, result: StepResult) -> None:
        """Count a step's rows in the counters, gauges and publication budget (a group
        member's step with no rows of its own counts the group's rows too)."""
        self.rows_since_publish += result.rows_scored
        self.rows_since_delta += result.rows_scored
        self.metrics.rows_trained.inc(result.rows_trained)
        if result.rows_duplicate:
            self.metrics.rows_dropped.labels("duplicate").inc(result.rows_duplicate)
        if result.rows_downsampled:
            self.metrics.rows_dropped.labels("downsampled").inc(result.rows_downsampled)
        if result.drifts:
            self.metrics.drift.inc(result.drifts)
            self.last_drift_at = time.time()
            log.warning(
                "learner drift: ADWIN flagged the per-row loss %d time(s) in a step of %d rows",
                result.drifts,
                result.rows_in,
            )
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self.trainer is None:
            return
        snap = self.trainer.metrics.snapshot()
        if snap["auc"] == snap["auc"]:
            self.metrics.auc.set(snap["auc"])
        if snap["logloss"] == snap["logloss"]:
            self.metrics.logloss.set(snap["logloss"])
        if self.trainer.served is not None:
            served = self.trainer.served.metrics.snapshot()["auc"]
            if served == served:
                self.metrics.served_auc.set(served)

    def due(self) -> bool:
        """True when new rows exist and the time or row budget since the last publication ran out."""
        if self.trainer is None or self.rows_since_publish == 0:
            return False
        if (
            self.publish_every_rows is not None
            and self.rows_since_publish >= self.publish_every_rows
        ):
            return True
        return (
            self.publish_every_seconds is not None
            and self.clock() - self._last_publish >= self.publish_every_seconds
        )

    def delta_due(self) -> bool:
        """True when deltas are on, there is a base, new rows, and the delta period ran out."""
        return self.rows_since_delta > 0 and self.delta_period_over()

    def maybe_publish(self, force: bool = False) -> dict[str, Any] | None:
        """Publish a full checkpoint if :meth:`due` (or ``force`` and there is a model),
        else a delta if :meth:`delta_due`; return the manifest."""
        with self._lock:
            if self.trainer is None:
                return None
            if self.due() or (force and self.rows_since_publish):
                return self.publish()
            if self.delta_due():
                return self.publish_delta()
            return None

    def publish_delta(self) -> dict[str, Any]:
        """Publish what changed since the last full checkpoint now; notify ``on_publish``."""
        with self._lock:
            trainer = self.trainer
            if trainer is None or self._base is None:
                raise RuntimeError("no full checkpoint to compute a delta against")
            t0 = time.perf_counter()
            base_version, base_sha256, base_weights = self._base
            weights = trainer.learner.state_dict(optimizer=False)["model"]
            try:
                manifest = self.store.publish_delta(
                    compute_delta(base_weights, weights),
                    base=base_version,
                    base_sha256=base_sha256,
                    rows_trained=trainer.rows_trained,
                    watermarks=trainer.watermarks_json(),
                    metrics=trainer.snapshot(),
                )
            except CheckpointError as exc:
                # our base is gone from the store or is another checkpoint now: a full
                # checkpoint instead, which the next deltas are computed against
                self.deltas_refused += 1
                self.last_error = f"delta not published, a full checkpoint instead: {exc}"
                log.warning(self.last_error)
                return self.publish()
            if trainer.served is not None:
                trainer.served.publish(trainer.learner.serving_model(), self.clock())
            self.metrics.delta_seconds.observe(time.perf_counter() - t0)
            self.metrics.publications.inc()
            self.publications += 1
            self.deltas += 1
            self.version = manifest["version"]
            self.metrics.version.labels(self.store.model).set(int(self.version))
            self.rows_since_delta = 0
            # On a fixed cadence: the next delta is due one period after this one was,
            # not after its step and write (which would stretch every period by their
            # time); one that came more than a period late restarts the cadence.
            now, due = self.clock(), self._last_delta + self.delta_every_seconds
            self._last_delta = due if now - due < self.delta_every_seconds else now
        self._notify(manifest)
        return manifest

    def publish(self) -> dict[str, Any]:
        """Checkpoint the trainer into the store now and notify ``on_publish``."""
        with self._lock:
            trainer = self.trainer
            if trainer is None or trainer.schema_hash is None or trainer.schema_json is None:
                raise RuntimeError("nothing to publish: no batch has been processed yet")
            if not isinstance(trainer.learner, Publishable):
                raise RuntimeError("only a Publishable learner (checkpointable, servable) can be published")
            t0 = time.perf_counter()
            # Layout (see learner.store): weights at "model" so serving needs nothing else.
            learner_state = trainer.learner.state_dict(optimizer=self.checkpoint_optimizer)
            state = {
                "model": learner_state["model"],
                "optimizer": learner_state["optimizer"],
                "trainer": trainer.state(include_learner=False),
                "consumer_positions": dict(self.consumer_positions),
            }
            config = {
                "model": trainer.learner.model.spec.to_dict(),
                "item_field": trainer.item_field,
                "downsample": state["trainer"]["downsample"],
            }
            manifest = self.store.publish(
                state,
                config=config,
                feature_schema_json=trainer.schema_json,
                feature_schema_hash=trainer.schema_hash,
                rows_trained=trainer.rows_trained,
                watermarks=trainer.watermarks_json(),
                metrics=trainer.snapshot(),
                parent=self.version,
            )
            if trainer.served is not None:
                trainer.served.publish(trainer.learner.serving_model(), self.clock())
            self.metrics.publish_seconds.observe(time.perf_counter() - t0)
            self.metrics.publications.inc()
            self.publications += 1
            self.version = manifest["version"]
            self.metrics.version.labels(self.store.model).set(int(self.version))
            if self.delta_every_seconds is not None:
                self._base = (
                    manifest["version"],
                    manifest["sha256"],
                    {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
                     for k, v in learner_state["model"].items()},
                )
            self.rows_since_publish = self.rows_since_delta = 0
            self._last_publish = self._last_delta = self.clock()
        self._notify(manifest)
        return manifest

    def _notify(self, manifest: dict[str, Any]) -> None:
        if self.on_publish is not None:
            try:
                self.on_publish(manifest)
            except Exception as exc:  # a failed notification must not kill training
                self.last_error = f"on_publish failed for version {manifest['version']}: {exc!r}"
                log.exception("on_publish failed")

    def status(self) -> dict[str, Any]:
        """Health summary for ``headwater status`` and the ops API."""
        # No lock: the training thread holds it almost continuously, and a status
        # reader (the heartbeat) must never starve behind it. Reads are of simple
        # attributes; a snapshot a step old is fine for a status.
        t = self.trainer
        snap = t.metrics.snapshot() if t else {}
        served = t.served.metrics.snapshot() if t is not None and t.served is not None else {}
        return {
            "model": self.store.model,
            "version": self.version,
            "rows_trained": t.rows_trained if t else 0,
            "rows_dropped": dict(t.rows_dropped, invalid_batch=self.invalid_batches)
            if t
            else {"invalid_batch": self.invalid_batches},
            "auc": snap.get("auc"),
            "logloss": snap.get("logloss"),
            "rolling_auc": snap.get("rolling_auc"),
            "served_auc": _finite(served.get("auc")),
            "served_rolling_auc": _finite(served.get("rolling_auc")),
            "pending_rows": self._pending_rows,
            "drift_total": t.metrics.drift_total if t else 0,
            "last_drift_at": self.last_drift_at,
            "backlog": t.last_backlog if t else 0,
            "watermarks": t.watermarks_json() if t else {},
            "publications": self.publications,
            "deltas": self.deltas,
            "last_error": self.last_error,
            "uptime": self.clock() - self._started,
        }

    # ---- asyncio seams ---------------------------------------------------------------
    async def aprocess(self, payload: bytes, backlog: int | None = None) -> StepResult | None:
        """:meth:`process` in a worker thread, for callers living on an event loop."""
        return await asyncio.to_thread(self.process, payload, backlog)

    async def amaybe_publish(self) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.maybe_publish)
