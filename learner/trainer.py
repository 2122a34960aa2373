"""Test-then-train over train batches: dedup by watermark, score, update metrics, learn.

Invariants:

* Per ``(source_topic, source_partition)`` the trainer keeps the watermark ``(offset,
  sub)`` of the *next* row it has not handled; rows below it are dropped as duplicates,
  so replaying a batch (at-least-once delivery, a restart) never trains a row twice.
* Every row is scored before the model learns from it (prequential evaluation).
* When the backlog exceeds a threshold, negatives are kept with rate ``r`` and the
  training logit is shifted by ``-log r`` so the model stays calibrated on the full
  distribution (the log-odds correction of Monolith / He et al. 2014): served
  probabilities need no correction. Dropped negatives are still scored and counted.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from learner.batch import TrainBatch
from learner.metrics import ColdItemTracker, PrequentialMetrics
from learner.protocol import Learner, Publishable, TorchLearner, concat_rows, take

__all__ = [
    "DownsampleConfig",
    "PrequentialTrainer",
    "SchemaMismatchError",
    "ServedLag",
    "StepResult",
    "TrainerSettings",
]


class SchemaMismatchError(ValueError):
    """A batch's feature-schema hash differs from the model's (a new schema = a new model)."""


@dataclass
class DownsampleConfig:
    """Negative down-sampling while falling behind.

    ``backlog_threshold`` is in rows (``None`` disables it); negatives are kept with
    probability ``negative_rate`` while the backlog is above it.
    """

    backlog_threshold: int | None = None
    negative_rate: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.negative_rate <= 1.0:
            raise ValueError(f"negative_rate must be in (0, 1], got {self.negative_rate}")


@dataclass
class StepResult:
    """What one :meth:`PrequentialTrainer.step` did."""

    rows_in: int
    rows_duplicate: int = 0
    rows_scored: int = 0
    rows_trained: int = 0
    rows_downsampled: int = 0
    drifts: int = 0
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: labels of the scored rows (``scores[i]`` is the prequential score of ``labels[i]``)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kept: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


class ServedLag:
    """Scores each row with the model serving runs at that moment: the last publication.

    Serving answers with the newest published version once it has loaded it, so a row
    arriving between two publications is scored by a snapshot that is up to one period
    (plus the load delay) old. :meth:`publish` takes a frozen copy of the learner's
    model when a version is published; it starts serving ``delay`` seconds later (on
    the service's clock). :meth:`observe` scores rows with the snapshot in service
    before the learner trains on them, feeding ``metrics``: the *served-lag* AUC, which
    is what users of ``/v1/score`` get, beside the prequential AUC of the live weights.
    ``sample`` scores that share of rows only (a forward pass costs about a third of a
    training step). ``record`` (benchmarks) keeps every row's score in :attr:`history`,
    NaN while nothing serves, and scores every row.
    """

    def __init__(
        self,
        metrics: PrequentialMetrics | None = None,
        delay: float = 1.0,
        sample: float = 1.0,
        seed: int = 0,
        record: bool = False,
    ) -> None:
        if not 0.0 < sample <= 1.0:
            raise ValueError(f"served-lag sample must be in (0, 1], got {sample}")
        self.metrics = metrics or PrequentialMetrics()
        self.delay = float(delay)
        self.sample = float(sample)
        self.rng = np.random.default_rng(seed)
        self._serving: Any = None
        self._queued: list[tuple[float, Any]] = []
        # record=True (benchmarks): every observed row's score, NaN while nothing serves
        self.history: list[np.ndarray] | None = [] if record else None

    def publish(self, model: torch.nn.Module, now: float) -> None:
        snap = copy.deepcopy(model)
        snap.eval()
        self._queued.append((now + self.delay, snap))

    def observe(self, rows: Any, now: float) -> None:
        while self._queued and self._queued[0][0] <= now:
            self._serving = self._queued.pop(0)[1]
        n = len(rows.labels)
        if self._serving is None or not n:
            if self.history is not None:
                self.history.append(np.full(n, np.nan))
            return  # nothing served yet: serving has no model to answer with
        if self.sample < 1.0 and self.history is None:
            rows = take(rows, self.rng.random(n) < self.sample)
            if not len(rows.labels):
                return
        with torch.no_grad():
            p = torch.sigmoid(self._serving.logits(rows.categorical, rows.dense)).numpy()
        if self.history is not None:
            self.history.append(p.astype(np.float64))
        self.metrics.update(np.asarray(rows.labels), p)


def _at_or_above(offsets: np.ndarray, subs: np.ndarray, mark: tuple[int, int]) -> np.ndarray:
    off, sub = mark
    return (offsets > off) | ((offsets == off) & (subs >= sub))


class PrequentialTrainer:
    """Drives any :class:`~learner.protocol.Learner` over decoded train batches.

    ``schema_hash`` pins the feature schema (taken from the first batch if ``None``).
    ``item_field`` names the categorical field whose first ``cold_k`` labelled rows
    per item feed the cold-item AUC. ``num_threads`` sets torch's intra-op threads
    (process-wide; default 1 because the learner shares a 2-core box with the worker).
    """

    def __init__(
        self,
        learner: Learner,
        *,
        schema_hash: str | None = None,
        schema_json: str | None = None,
        metrics: PrequentialMetrics | None = None,
        downsample: DownsampleConfig | None = None,
        item_field: str | None = None,
        cold_k: int = 10,
        num_threads: int | None = 1,
        served: ServedLag | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.learner = learner
        self.served = served
        self.clock = clock or time.monotonic
        self.schema_hash = schema_hash
        self.schema_json = schema_json
        self.metrics = metrics or PrequentialMetrics()
        self.downsample = downsample or DownsampleConfig()
        self.item_field = item_field
        self.cold = ColdItemTracker(cold_k)
        self.watermarks: dict[tuple[str, int], tuple[int, int]] = {}
        self.rows_trained = 0
        self.rows_dropped: dict[str, int] = {
            "duplicate": 0, "downsampled": 0, "schema": 0, "stale": 0,
        }
        self.batches = 0
        self.last_backlog = 0
        self.rng = np.random.default_rng(self.downsample.seed)
        if num_threads is not None:
            torch.set_num_threads(num_threads)

    def check_schema(self, batch: TrainBatch) -> None:
        """Adopt the first batch's schema; raise :class:`SchemaMismatchError` on a change."""
        if self.schema_hash is None:
            self.schema_hash, self.schema_json = batch.schema_hash, batch.schema_json
        elif batch.schema_hash != self.schema_hash:
            self.rows_dropped["schema"] += len(batch)
            raise SchemaMismatchError(
                f"batch from {batch.source_topic}:{batch.source_partition} has feature schema "
                f"{batch.schema_hash[:12]}…, the model was built for {self.schema_hash[:12]}…; "
                "a schema change needs a new model (new model name or empty store)"
            )

    def step(self, batch: TrainBatch, backlog: int = 0, record_cold: bool = True) -> StepResult:
        """Dedup, score, update metrics, then train on one batch."""
        return self.step_many([batch], backlog=backlog, record_cold=record_cold)

    def step_many(
        self, batches: Sequence[TrainBatch], backlog: int = 0, record_cold: bool = True
    ) -> StepResult:
        """Dedup each batch by its partition's watermark, then score and train all kept
        rows as *one* optimizer step (messages accumulated by the service)."""
        for batch in batches:
            self.check_schema(batch)
        self.last_backlog = int(backlog)
        rows, kept = self.claim_rows(batches)
        n_in = len(kept)
        result = StepResult(rows_in=n_in, rows_duplicate=int(n_in - kept.sum()))
        self.rows_dropped["duplicate"] += result.rows_duplicate
        if rows is None:
            return result
        labels = np.asarray(rows.labels)
        if self.served is not None:
            self.served.observe(rows, self.clock())

        ds = self.downsample
        sampling = (
            ds.backlog_threshold is not None
            and backlog > ds.backlog_threshold
            and ds.negative_rate < 1
        )
        if sampling:
            probs = self.learner.predict_proba_many(rows)
            train_mask = (labels == 1) | (self.rng.random(labels.size) < ds.negative_rate)
            sub = take(rows, train_mask)
            self.learner.learn_many(sub, logit_offset=-math.log(ds.negative_rate))
            result.rows_downsampled = int((~train_mask).sum())
            result.rows_trained = int(train_mask.sum())
        else:
            probs = self.learner.score_and_learn(rows)
            result.rows_trained = len(labels)

        result.rows_scored = len(labels)
        result.scores, result.labels, result.kept = probs, labels, kept
        result.drifts = self.metrics.update(labels, probs)
        if self.item_field is not None:
            j = batches[0].categorical_fields.index(self.item_field)
            self.cold.update(rows.categorical[:, j], labels, probs, record=record_cold)

        self.rows_trained += result.rows_trained
        self.rows_dropped["downsampled"] += result.rows_downsampled
        self.batches += 1
        return result

    def claim_rows(self, batches: Sequence[TrainBatch]) -> tuple[Any, np.ndarray]:
        """Claim the rows of ``batches`` not trained before (:meth:`claim`, batch by batch).

        Returns ``(rows, kept)``: the claimed rows as one batch (``None`` when none is
        left) and the mask of kept rows over all the batches' rows, in order. The
        single-process step and the data-parallel one (:mod:`learner.distributed`) both
        claim through here.
        """
        keeps, parts = [], []
        for batch in batches:
            keep = self.claim(batch)
            keeps.append(keep)
            if keep.any():
                parts.append(batch if keep.all() else take(batch, keep))
        kept = np.concatenate(keeps) if keeps else np.zeros(0, dtype=bool)
        rows = None if not parts else parts[0] if len(parts) == 1 else concat_rows(parts)
        return rows, kept

    def claim(self, batch: TrainBatch) -> np.ndarray:
        """Rows of ``batch`` at or past its partition's watermark (the mask); the watermark
        moves past them, so a later copy of the same rows is a duplicate."""
        key = (batch.source_topic, int(batch.source_partition))
        mark = self.watermarks.get(key)
        keep = (
            np.ones(len(batch), dtype=bool)
            if mark is None
            else _at_or_above(batch.offsets, batch.subs, mark)
        )
        if keep.any():
            offs, subs = batch.offsets[keep], batch.subs[keep]
            last = int(np.lexsort((subs, offs))[-1])
            self.watermarks[key] = (int(offs[last]), int(subs[last]) + 1)
        return keep

    def skip(self, batch: TrainBatch) -> int:
        """Advance the watermark past a batch without scoring or training it (too stale
        to be worth training: see ``LearnerService``'s staleness bound); returns the rows
        skipped (duplicates excluded)."""
        self.check_schema(batch)
        n = int(self.claim(batch).sum())
        if not n:
            return 0
        self.rows_dropped["stale"] = self.rows_dropped.get("stale", 0) + n
        return n

    def snapshot(self) -> dict[str, float]:
        """Metrics for a manifest / status page (plain floats)."""
        out = self.metrics.snapshot()
        out["rows_trained"] = float(self.rows_trained)
        out["backlog_rows"] = float(self.last_backlog)
        for reason, count in self.rows_dropped.items():
            out[f"rows_dropped_{reason}"] = float(count)
        if self.item_field is not None:
            out["cold_item_auc"] = self.cold.auc()
        if self.served is not None:
            served = self.served.metrics.snapshot()
            out["served_auc"] = served["auc"]
            out["served_logloss"] = served["logloss"]
            out["served_rolling_auc"] = served["rolling_auc"]
            out["served_rows_scored"] = served["rows_scored"]
        stats = getattr(
            getattr(getattr(self.learner, "model", None), "embedding", None), "stats", None
        )
        if stats is not None:
            out.update({f"embedding_{k}": v for k, v in stats().items()})
        return out

    def watermarks_json(self) -> dict[str, dict[str, int]]:
        """Watermarks as ``{"topic:partition": {"offset": o, "sub": s}}`` (next row to handle)."""
        return {
            f"{t}:{p}": {"offset": o, "sub": s}
            for (t, p), (o, s) in sorted(self.watermarks.items())
        }

    def state(self, include_learner: bool = True) -> dict[str, Any]:
        """Everything a restart needs, as tensors and plain containers."""
        out: dict[str, Any] = {
            "watermarks": [[t, p, o, s] for (t, p), (o, s) in sorted(self.watermarks.items())],
            "rows_trained": self.rows_trained,
            "rows_dropped": dict(self.rows_dropped),
            "batches": self.batches,
            "metrics": self.metrics.state(),
            "schema_hash": self.schema_hash,
            "schema_json": self.schema_json,
            "downsample": asdict(self.downsample),
        }
        if self.served is not None:
            out["served_metrics"] = self.served.metrics.state()
        if include_learner and isinstance(self.learner, Publishable):
            out["learner"] = self.learner.state_dict()
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        self.watermarks = {(str(t), int(p)): (int(o), int(s)) for t, p, o, s in state["watermarks"]}
        self.rows_trained = int(state["rows_trained"])
        self.rows_dropped = {k: int(v) for k, v in state["rows_dropped"].items()}
        self.batches = int(state.get("batches", 0))
        self.metrics.load_state(state["metrics"])
        if self.served is not None and "served_metrics" in state:
            self.served.metrics.load_state(state["served_metrics"])
        self.schema_hash = state.get("schema_hash")
        self.schema_json = state.get("schema_json")
        if "learner" in state and isinstance(self.learner, Publishable):
            self.learner.load_state_dict(state["learner"])


@dataclass
class TrainerSettings:
    """Plain-data recipe for a trainer; :meth:`factory` gives a service's ``trainer_factory``.

    ``head`` overrides the preset's sizes (e.g. ``{"conv_batchnorm": True}``);
    ``embedding`` is an :class:`~learner.embeddings.EmbeddingConfig` as a dict.
    ``lr`` drives the network (Adam 1e-3, as the paper); ``embedding_lr`` the tables
    (1e-2 by default: on MovieLens one pass, +0.02 prequential AUC over 1e-3 for FGCNN,
    bench/results/learner.md; ``None`` = same as ``lr``).
    """

    kind: str = "fgcnn"
    preset: str = "compact"
    head: dict[str, Any] = field(default_factory=dict)
    embedding: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    embedding_lr: float | None = 1e-2
    optimizer: str = "adam"
    downsample: dict[str, Any] = field(default_factory=dict)
    item_field: str | None = None
    cold_k: int = 10
    window: int = 1000
    n_thresholds: int = 10
    num_threads: int | None = 1
    seed: int = 0
    reference_rows: int | None = None
    served_lag: dict[str, Any] | None = None
    dense_norm: bool = False
    wide: bool = False
    wide_lr: float | None = None
    wide_ids: float = 0.0
    #: EM3 fields (``learner.em3``; ``ModelSpec.em3``): empty = off
    em3: dict[str, Any] = field(default_factory=dict)

    def build(self, schema_json: str) -> PrequentialTrainer:
        """A fresh trainer for a feature schema (the model's fields come from it)."""
        import hashlib

        from learner.batch import schema_fields
        from learner.embeddings import EmbeddingConfig
        from learner.models import ModelSpec, build_model, preset_head

        categorical, dense = schema_fields(schema_json)
        emb = EmbeddingConfig.from_dict(self.embedding) if self.embedding else EmbeddingConfig()
        head = {**preset_head(self.kind, self.preset), **self.head}
        spec = ModelSpec(
            self.kind, categorical, dense, head, emb.to_dict(), self.dense_norm, self.wide,
            self.wide_ids, dict(self.em3),
        )
        torch.manual_seed(self.seed)
        model = build_model(spec)
        learner = TorchLearner(
            model,
            lr=self.lr,
            optimizer=self.optimizer,
            embedding_lr=self.embedding_lr,
            reference_rows=self.reference_rows,
            wide_lr=self.wide_lr,
        )
        if self.item_field is not None and self.item_field not in categorical:
            raise ValueError(
                f"item_field {self.item_field!r} is not a categorical field of {categorical}"
            )
        return PrequentialTrainer(
            learner,
            schema_hash=hashlib.sha256(schema_json.encode("utf-8")).hexdigest(),
            schema_json=schema_json,
            metrics=PrequentialMetrics(window=self.window, n_thresholds=self.n_thresholds),
            downsample=DownsampleConfig(**self.downsample),
            item_field=self.item_field,
            cold_k=self.cold_k,
            num_threads=self.num_threads,
            served=None
            if self.served_lag is None
            else ServedLag(
                PrequentialMetrics(window=self.window, n_thresholds=self.n_thresholds),
                **self.served_lag,
            ),
        )

    def factory(self) -> Callable[[str], PrequentialTrainer]:
        return self.build
