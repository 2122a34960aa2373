"""Data-parallel learner: several processes train one model with ``torch.distributed`` (gloo).

Every member owns the ``train-batches`` partitions ``p`` with ``p % world_size == rank``
and trains only their rows; each optimizer step is a collective:

1. a *control round* (one ``all_reduce`` of a small ``[world, k]`` table, each member
   filling its own row) tells every member what every other one holds: rows waiting,
   whether its last poll came back empty, how long its oldest row waited, its backlog,
   and whether it was asked to stop. From that table every member takes the same
   decisions: step now, publish now, stop;
2. a *step*: each member scores and back-propagates its own rows (the loss is the sum of
   its rows' log-loss divided by the group's row count), then the dense gradients (one
   flat ``all_reduce``) and the embedding table's **sparse** gradient (gloo's sparse
   ``all_reduce``: indices and values of the rows any member touched) are summed, so
   every member applies the gradient of the group's mean loss with identical optimizer
   state: the members' models stay equal bit for bit. Dense-feature statistics are
   reduced the same way; scores, labels and items are gathered to rank 0 for the
   prequential metrics;
3. a *publication* (rank 0 decides when): every member sends rank 0 its consumer
   positions and watermarks; rank 0 writes one checkpoint that covers every partition.
   With deltas on (``delta_every_seconds``), each time rank 0's delta period runs out the
   group steps on what waits and gathers the same way, and rank 0 publishes a delta
   against its last full checkpoint (the group's rows and watermarks, as the single
   learner's delta).

Restart contract (as the single learner's): all members resume from the latest good
checkpoint and seek every partition to its positions, so after a member dies (kill -9)
the group re-forms and re-trains exactly the rows published checkpoints do not cover:
nothing is lost, nothing trained twice. A member whose peer died gets an error from
its next collective and exits *without* publishing; :func:`supervise` (``headwater
learner --procs N``) then stops the others and starts a new generation.

Limits: hashed embeddings only (dynamic tables admit ids per process, which would make
the members' mappings differ). The served-lag AUC is measured on rank 0's partitions.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.signals import on_signals
from learner.batch import TrainBatch
from learner.embeddings import HashedEmbedding
from learner.kafka_loop import LearnerLoop, train_batches_consumer
from learner.protocol import TorchLearner, take
from learner.trainer import PrequentialTrainer, StepResult

__all__ = ["DataParallelStep", "DistributedLearnerLoop", "GroupConfig", "init_group", "supervise"]

log = logging.getLogger(__name__)

# control table columns
(_PENDING, _FULL, _DRY, _WAIT_MS, _STOP, _PUBLISH, _BACKLOG, _HAS_TRAINER, _UNPUBLISHED,
 _DELTA) = range(10)
_NCTRL = 10


@dataclass(frozen=True)
class GroupConfig:
    """Where a member stands in its group.

    ``master`` is ``host:port`` of the group's key-value store (a ``TCPStore``); rank 0
    hosts it unless ``hosted`` (the supervisor hosts one store for every generation and
    ``generation`` prefixes its keys, so a re-formed group never reads a dead one's).
    """

    rank: int
    world_size: int
    master: str
    generation: int = 0
    hosted: bool = False
    timeout_seconds: float = 120.0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"learner rank must be in [0, world size), got rank {self.rank} of {self.world_size}"
            )
        if ":" not in self.master:
            raise ValueError(f"learner group master must be host:port, got {self.master!r}")


def init_group(cfg: GroupConfig) -> None:
    """Join the gloo process group described by ``cfg`` (blocks until every member joined)."""
    host, _, port = cfg.master.rpartition(":")
    timeout = timedelta(seconds=cfg.timeout_seconds)
    store = dist.TCPStore(
        host,
        int(port),
        world_size=None if cfg.hosted else cfg.world_size,
        is_master=cfg.rank == 0 and not cfg.hosted,
        timeout=timeout,
        wait_for_workers=False,
    )
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"headwater-learner/{cfg.generation}", store),
        rank=cfg.rank,
        world_size=cfg.world_size,
        timeout=timeout,
    )


def owned_partitions(partitions: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The partitions a member trains: ``p % world_size == rank``.

    >>> owned_partitions([0, 1, 2, 3], 1, 2)
    [1, 3]
    """
    return sorted(p for p in partitions if p % world_size == rank)


class DataParallelStep:
    """One data-parallel test-then-train step of a member's rows (see the module doc).

    Every member of the group must call :meth:`__call__` the same number of times, with
    the same ``backlog`` (the group's); a member without rows passes an empty list.
    The returned :class:`StepResult` counts the *group's* rows scored and trained (what
    rank 0 publishes); duplicates and down-sampled rows are the member's own.
    """

    def __init__(self, trainer: PrequentialTrainer) -> None:
        learner = trainer.learner
        if not isinstance(learner, TorchLearner):
            raise ValueError("the data-parallel learner trains torch models only")
        if not isinstance(learner.model.embedding, HashedEmbedding):
            raise ValueError(
                "the data-parallel learner needs hashed embeddings: dynamic tables admit ids "
                "per process, so the members' id -> row mappings would differ"
            )
        self.trainer = trainer
        self.learner = learner
        self.model = learner.model
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.table = self.model.embedding.table.weight
        self.dense_params = [p for p in self.model.parameters() if p is not self.table]
        self.n_dense = len(self.model.spec.dense)

    def __call__(self, batches: Sequence[TrainBatch], backlog: int = 0) -> StepResult:
        t, model = self.trainer, self.model
        for batch in batches:
            t.check_schema(batch)
        t.last_backlog = int(backlog)
        rows, kept = t.claim_rows(batches)
        n_in = len(kept)
        n_dup = n_in - int(kept.sum())
        result = StepResult(rows_in=n_in, rows_duplicate=n_dup)
        t.rows_dropped["duplicate"] += n_dup
        n_scored = 0 if rows is None else len(rows.labels)
        ds = t.downsample
        sampling = (
            ds.backlog_threshold is not None and backlog > ds.backlog_threshold
            and ds.negative_rate < 1
        )
        probs = None
        train_rows = rows
        if rows is not None:
            if self.rank == 0 and t.served is not None:
                t.served.observe(rows, t.clock())
            labels = np.asarray(rows.labels)
            if sampling:
                mask = (labels == 1) | (t.rng.random(labels.size) < ds.negative_rate)
                train_rows = take(rows, mask)
                result.rows_downsampled = int((~mask).sum())
            if sampling or not model.train_equals_eval:
                probs = self.learner.predict_proba_many(rows)
        n_train = 0 if train_rows is None else len(train_rows.labels)

        # group sizes and dense-feature moments of the rows being trained
        dense = (
            TorchLearner.dense_tensor(train_rows) if n_train else torch.zeros((0, self.n_dense))
        )
        stats = torch.zeros((self.world, 2 + 2 * self.n_dense), dtype=torch.float64)
        stats[self.rank, 0] = n_train
        stats[self.rank, 1] = n_scored
        if n_train and self.n_dense:
            d64 = dense.double()
            stats[self.rank, 2 : 2 + self.n_dense] = d64.sum(0)
            stats[self.rank, 2 + self.n_dense :] = (d64 * d64).sum(0)
        dist.all_reduce(stats)
        total_train = int(stats[:, 0].sum())
        scored_per_rank = [int(x) for x in stats[:, 1].tolist()]

        if total_train:
            logits = self._backward(train_rows, dense, total_train, sampling)
            if probs is None and logits is not None:
                probs = torch.sigmoid(logits).numpy().astype(np.float64)
            self._reduce_and_step(total_train)
            if model.dense_norm is not None:
                s = stats.sum(0)
                mean = s[2 : 2 + self.n_dense] / total_train
                var = (s[2 + self.n_dense :] / total_train - mean * mean).clamp_min(0.0)
                model.dense_norm.update_moments(mean.float(), var.float(), total_train)
        self._gather_metrics(rows, probs, scored_per_rank, result)
        result.rows_scored = sum(scored_per_rank)
        result.rows_trained = total_train
        t.rows_trained += total_train
        t.rows_dropped["downsampled"] += result.rows_downsampled
        t.batches += 1
        if probs is not None:
            result.scores = probs
            result.labels = np.asarray(rows.labels)
        return result

    def _backward(
        self, rows: Any, dense: torch.Tensor, total: int, sampling: bool
    ) -> torch.Tensor | None:
        model = self.model
        model.train()
        model.zero_grad(set_to_none=True)
        if rows is None or not len(rows.labels):
            return None
        idx = model.embedding.lookup(rows.categorical)
        logits = model(idx, dense)
        y = torch.from_numpy(np.asarray(rows.labels, dtype=np.float32))
        offset = -math.log(self.trainer.downsample.negative_rate) if sampling else 0.0
        loss = F.binary_cross_entropy_with_logits(logits + offset, y, reduction="sum") / total
        loss.backward()
        return logits.detach()

    def _reduce_and_step(self, total: int) -> None:
        grads = [
            p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense_params
        ]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p in self.dense_params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        g = self.table.grad
        if g is None:
            g = torch.sparse_coo_tensor(
                torch.zeros((1, 0), dtype=torch.long),
                torch.zeros((0, self.table.shape[1])),
                self.table.shape,
            )
        dist.all_reduce(g)  # gloo: sparse all-reduce, coalesced result
        g = g.coalesce()
        self.table.grad = g
        if self.learner.reference_rows:
            self.learner.scale_lr(min(1.0, total / self.learner.reference_rows))
        if self.learner.optimizer is not None:
            self.learner.optimizer.step()
        self.learner.sparse_optimizer.step()
        self.model.embedding.mark_dirty(g.indices()[0].numpy())

    def _gather_metrics(
        self, rows: Any, probs: np.ndarray | None, per_rank: list[int], result: StepResult
    ) -> None:
        """Labels, scores and items of every member's scored rows -> rank 0's metrics."""
        width = max(per_rank)
        if width == 0:
            return
        t = self.trainer
        n = 0 if rows is None else len(rows.labels)
        ly = torch.zeros((width, 2), dtype=torch.float64)
        items = torch.zeros(width, dtype=torch.int64)
        if n:
            ly[:n, 0] = torch.from_numpy(np.asarray(rows.labels, dtype=np.float64))
            ly[:n, 1] = torch.from_numpy(np.asarray(probs, dtype=np.float64))
            if t.item_field is not None:
                j = self.model.spec.categorical.index(t.item_field)
                items[:n] = torch.from_numpy(np.asarray(rows.categorical[:, j], dtype=np.int64))
        if self.rank == 0:
            ly_all = [torch.zeros_like(ly) for _ in range(self.world)]
            it_all = [torch.zeros_like(items) for _ in range(self.world)]
            dist.gather(ly, ly_all, dst=0)
            dist.gather(items, it_all, dst=0)
            y = np.concatenate([a[:k, 0].numpy() for a, k in zip(ly_all, per_rank, strict=True)])
            p = np.concatenate([a[:k, 1].numpy() for a, k in zip(ly_all, per_rank, strict=True)])
            result.drifts = t.metrics.update(y.astype(np.int64), p)
            if t.item_field is not None:
                it = np.concatenate([a[:k].numpy() for a, k in zip(it_all, per_rank, strict=True)])
                t.cold.update(it, y.astype(np.int64), p)
        else:
            dist.gather(ly, None, dst=0)
            dist.gather(items, None, dst=0)


class DistributedLearnerLoop(LearnerLoop):
    """One member of a data-parallel learner group (see the module doc).

    Takes :class:`~learner.kafka_loop.LearnerLoop`'s arguments plus ``group``. Only rank 0
    publishes and announces versions; every member commits its own partitions' trained
    positions under ``lag_group`` so ``headwater lag`` shows the group's backlog.
    """

    def __init__(self, *args: Any, group: GroupConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        svc = self.service
        # the group decides when to step: the service only accumulates
        self.step_rows, self.step_wait_seconds = svc.step_rows, svc.step_wait_seconds
        svc.step_rows, svc.step_wait_seconds = 2**62, math.inf
        self._stepper: DataParallelStep | None = None
        self._stale_msgs: list[tuple[bytes, tuple[str, int, int]]] = []
        self._dropped_base: dict[str, int] = {}
        self._synced = svc.trainer is not None  # resumed: every member loads the same version
        self._base_positions: dict[str, int] = {}
        self._base_watermarks: dict[tuple[str, int], tuple[int, int]] = {}
        self.steps = 0
        self._stop_at = 0.0

    def _owned(self, parts: set[int]) -> list[int]:
        return owned_partitions(list(parts), self.group.rank, self.group.world_size)

    # ---- collectives -------------------------------------------------------------------
    def _control(self, dry: bool) -> torch.Tensor:
        svc = self.service
        row = torch.zeros((self.group.world_size, _NCTRL), dtype=torch.int64)
        r = row[self.group.rank]
        r[_PENDING] = svc.pending_rows
        r[_FULL] = int(svc.pending_rows >= self.step_rows or bool(self._stale_msgs))
        r[_DRY] = int(dry)
        if svc.pending_rows:
            r[_WAIT_MS] = int(1000 * (self.service.clock() - svc.pending_since))
        r[_STOP] = int(self._stop.is_set())
        r[_PUBLISH] = int(self.group.rank == 0 and svc.due())
        r[_BACKLOG] = self._backlog_rows() if self._assigned else 0
        r[_HAS_TRAINER] = int(svc.trainer is not None)
        r[_UNPUBLISHED] = int(self.group.rank == 0 and svc.rows_since_publish > 0)
        r[_DELTA] = int(self.group.rank == 0 and svc.delta_period_over())
        dist.all_reduce(row)
        return row

    def _share_trainer(self, ctrl: torch.Tensor) -> None:
        """Members without a model build it from the first member's schema; then rank 0's
        initial weights are copied to all, so every member starts from the same model."""
        has = ctrl[:, _HAS_TRAINER]
        if int(has.sum()) == 0:
            return
        if int(has.min()) == 0:
            src = int(torch.nonzero(has)[0, 0])
            box = [self.service.trainer.schema_json if self.group.rank == src else None]
            dist.broadcast_object_list(box, src=src)
            if self.service.trainer is None:
                self.service.trainer = self.service.trainer_factory(box[0])
                self.service.trainer.clock = self.service.clock
        if not self._synced:
            model = self.service.trainer.learner.model
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, src=0)
            self._synced = True
        if self._stepper is None:
            self._stepper = DataParallelStep(self.service.trainer)
            self.service.stepper = self._stepper
            self._dropped_base = dict(self.service.trainer.rows_dropped)

    def _step(self, backlog: int) -> None:
        svc = self.service
        if svc.pending_rows:
            svc.train_pending(backlog=backlog)
        else:
            assert self._stepper is not None
            # the group's rows, trained in a step this member had no rows for: counted here
            # too (rank 0's /metrics and publication budget cover the whole group)
            svc.account(self._stepper([], backlog=backlog))
        for payload, position in self._stale_msgs:
            svc.skip_stale(payload, position=position)  # nothing waits: no training inside
        self._stale_msgs.clear()
        self.steps += 1

    def _publish(self, delta: bool = False) -> None:
        """Collective: gather every member's positions, watermarks and drop counts; rank 0
        writes the checkpoint covering all partitions (``delta``: a delta publication, if
        the group trained rows since the last one)."""
        t = self.service.trainer
        assert t is not None
        # Only what this member advanced since it resumed: every member resumed the whole
        # checkpoint, and its copies of other members' entries are stale. (The worker keys
        # train-batches by source partition, so one member owns each source partition.)
        mine = {
            "positions": _advanced(self.service.consumer_positions, self._base_positions),
            "watermarks": _advanced(t.watermarks, self._base_watermarks),
            "dropped": {k: v - self._dropped_base.get(k, 0) for k, v in t.rows_dropped.items()},
        }
        box: list[Any] = [None] * self.group.world_size if self.group.rank == 0 else []
        dist.gather_object(mine, box if self.group.rank == 0 else None, dst=0)
        if self.group.rank != 0:
            return
        own = dict(t.rows_dropped)
        for doc in box:
            self.service.consumer_positions.update(doc["positions"])
            t.watermarks.update(doc["watermarks"])
        total = dict(self._dropped_base)
        for doc in box:
            for k, v in doc["dropped"].items():
                total[k] = total.get(k, 0) + v
        t.rows_dropped = total
        try:
            if not delta:
                self.service.publish()
            elif self.service.delta_due():
                self.service.publish_delta()
        finally:
            t.rows_dropped = own

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Consume, step and publish with the group until any member is asked to stop;
        a failed collective (a member died) raises, and nothing is published."""

        init_group(self.group)
        try:
            versions: list[Any] = [None] * self.group.world_size
            dist.all_gather_object(versions, self.service.version)
            if len(set(versions)) != 1:
                raise RuntimeError(f"learner group members resumed different versions: {versions}")
            self._consumer = train_batches_consumer(self.bootstrap, self.lag_group)
            self._base_positions = dict(self.service.consumer_positions)
            t = self.service.trainer
            self._base_watermarks = dict(t.watermarks) if t is not None else {}
            log.info(
                "learner member %d of %d (generation %d) at version %s",
                self.group.rank, self.group.world_size, self.group.generation, versions[0],
            )
            self._rounds()
            log.info("learner member %d: stopped with the group", self.group.rank)
        finally:
            t0 = time.monotonic()
            if self._consumer is not None:
                self._consumer.close()
            self._producer.close(timeout=10)
            if dist.is_initialized():
                dist.destroy_process_group()
            log.info("learner member %d: closed in %.1f s", self.group.rank,
                     time.monotonic() - t0)

    def _rounds(self) -> None:
        last_assign = 0.0
        while True:
            if time.monotonic() - last_assign > 10.0 or not self._assigned:
                self._assign()
                last_assign = time.monotonic()
            dry = True
            full = self.service.pending_rows >= self.step_rows or bool(self._stale_msgs)
            if self._assigned and not full and not self._stop.is_set():
                polled = self._consumer.poll(
                    timeout_ms=self.poll_timeout_ms, max_records=self.max_records
                )
                for tp, messages in polled.items():
                    for msg in messages:
                        dry = False
                        position = (tp.topic, tp.partition, msg.offset + 1)
                        if self._stale(msg) or self._stale_msgs:
                            # stale rows are skipped after the next step, in order
                            self._stale_msgs.append((msg.value, position))
                            continue
                        self.service.process(msg.value, position=position)
                        n = self.service.last_message_rows
                        if n:
                            self._rows_per_message += 0.05 * (n - self._rows_per_message)
            elif not full:
                self._stop.wait(self.poll_timeout_ms / 1000.0)
            if self._stop.is_set() and not self._stop_at:
                self._stop_at = time.monotonic()
            ctrl = self._control(dry)
            self._share_trainer(ctrl)
            # every decision below reads the reduced table only, so all members take it
            stop = bool(ctrl[:, _STOP].any())
            stepped = self._stepper is not None and self._should_step(ctrl, stop)
            if stepped:
                self._step(int(ctrl[:, _BACKLOG].sum()))
            if self._stepper is not None and (
                bool(ctrl[0, _PUBLISH])
                or (stop and (stepped or bool(ctrl[0, _UNPUBLISHED])))
            ):
                self._publish()
            elif self._stepper is not None and bool(ctrl[0, _DELTA]):
                self._publish(delta=True)  # rank 0's delta period ran out
            self._commit_trained()
            if stop:
                log.info("learner member %d: last round done %.1f s after the stop request "
                         "(stepped=%s)", self.group.rank, time.monotonic() - self._stop_at,
                         stepped)
                return

    def _should_step(self, ctrl: torch.Tensor, stop: bool) -> bool:
        pending = ctrl[:, _PENDING]
        full = ctrl[:, _FULL].bool()
        if int(pending.sum()) == 0 and not bool(full.any()):
            return False
        if stop:
            return True
        ready = full | ctrl[:, _DRY].bool()
        if bool(full.any()) and bool(ready.all()):
            return True
        if bool(ctrl[0, _DELTA]):  # what waits goes into rank 0's next delta (freshness)
            return True
        return int(ctrl[:, _WAIT_MS].max()) >= 1000 * self.step_wait_seconds


def _advanced(current: dict[Any, Any], base: dict[Any, Any]) -> dict[Any, Any]:
    """Entries of ``current`` that differ from ``base`` (positions and watermarks only move
    forward, so these are the ones this member moved).

    >>> _advanced({"a": 3, "b": 5}, {"a": 3, "b": 4})
    {'b': 5}
    """
    return {k: v for k, v in current.items() if base.get(k) != v}


# ---- supervisor -------------------------------------------------------------------------------
def supervise(procs: int, env: dict[str, str] | None = None, restart_delay: float = 1.0) -> int:
    """Run ``procs`` learner members (``python -m headwater learner``) on this machine as one
    group; when any member dies, stop the rest and start a new generation (all resume from
    the latest checkpoint). SIGTERM / SIGINT stop the group cleanly (a final publication).
    Returns 0 after a clean stop."""
    if procs < 1:
        raise ValueError(f"learner procs must be >= 1, got {procs}")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    stopping = threading.Event()
    children: list[subprocess.Popen] = []

    def _on_signal(_signum: int) -> None:
        stopping.set()
        for child in list(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    on_signals({signal.SIGTERM: _on_signal, signal.SIGINT: _on_signal})
    base = dict(os.environ if env is None else env)
    generation = 0
    while True:
        children[:] = []
        for rank in range(procs):
            member = dict(base)
            member.update({
                "HEADWATER_LEARNER_PROCS": "1",
                "HEADWATER_LEARNER_RANK": str(rank),
                "HEADWATER_LEARNER_WORLD_SIZE": str(procs),
                "HEADWATER_LEARNER_MASTER": f"127.0.0.1:{store.port}",
                "HEADWATER_LEARNER_GENERATION": str(generation),
                "HEADWATER_LEARNER_STORE_HOSTED": "1",
            })
            children.append(subprocess.Popen([sys.executable, "-m", "headwater", "learner"],
                                             env=member))
        log.info("learner group generation %d: members %s", generation,
                 [c.pid for c in children])
        while all(c.poll() is None for c in children) and not stopping.is_set():
            time.sleep(0.1)
        if stopping.is_set():
            t0 = time.monotonic()
            for child in children:  # also members started after the signal was handled
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            _wait_all(children, 60.0)
            log.info("learner group stopped: members exited %s in %.1f s",
                     [c.returncode for c in children], time.monotonic() - t0)
            return 0
        codes = [c.poll() for c in children]
        if all(code == 0 for code in codes):
            return 0
        log.warning("learner group generation %d: a member exited (%s); re-forming the group",
                    generation, codes)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        _wait_all(children, 10.0)
        if stopping.is_set():
            return 0
        generation += 1
        time.sleep(restart_delay)


def _wait_all(children: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)
