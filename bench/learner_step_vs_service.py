"""The learner service against the bare training step, side by side in one run, on the
product's own rows with the product's own trainer recipe.

Rows: the worker's ``train-batches`` messages of a MovieLens-100K replay
(``bench/pipeline_rows.py``: 33 categorical + 36 dense fields). Recipe: exactly what
``headwater learner`` builds (``streams.learner_runner.trainer_settings`` over default
settings: FGCNN with the default preset (``lean``), wide part, hashed tables, served-lag AUC, 50-threshold AUC).

* ``bare``: forward + log-loss + backward + Adam + SparseAdam of the same model on the
  same steps (the service's accumulation of messages into steps of >= 256 rows is
  replayed to get the steps), with index and dense tensors built before timing;
* ``service``: ``LearnerService.process`` on the Arrow payloads — decode, schema check,
  accumulation, dedup, served-lag scoring, test-then-train, metrics, publication every
  5 s into a real model store: the learner loop minus Kafka.

Rounds alternate (bare, service, bare, service, ...) and each starts from a fresh model;
medians are printed with the ratio and the load average. Both wall-clock and CPU-time
rates are printed: on a shared machine (load above the core count) the wall-clock rate
measures the neighbours, while rows per CPU-second of this process (one torch thread)
is what one dedicated core would do.

    .venv/bin/python bench/learner_step_vs_service.py --rounds 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline_rows import pipeline_rows  # noqa: E402
from core.settings import Settings  # noqa: E402
from learner.protocol import concat_rows  # noqa: E402
from learner.service import LearnerService  # noqa: E402
from learner.store import LocalModelStore  # noqa: E402
from streams.learner_runner import trainer_settings  # noqa: E402


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def steps_of(batches: list, step_rows: int) -> list[list[int]]:
    """Message indices per step, as the service accumulates them (>= step_rows rows)."""
    steps, cur, n = [], [], 0
    for i, b in enumerate(batches):
        cur.append(i)
        n += len(b)
        if n >= step_rows:
            steps.append(cur)
            cur, n = [], 0
    if cur:
        steps.append(cur)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="messages per round (0: all)")
    ap.add_argument("--only", choices=["bare", "service"], default=None,
                    help="run one side only (for a profiler)")
    args = ap.parse_args()

    settings = Settings()
    recipe = trainer_settings(settings)
    torch.set_num_threads(settings.torch_threads)
    rows = pipeline_rows()
    recipe.build(rows.schema_json)  # process warm-up (torch's lazy imports): neither side pays it
    payloads = rows.payloads[: args.limit or None]
    batches = rows.batches[: args.limit or None]
    total = sum(len(b) for b in batches)
    steps = steps_of(batches, settings.learner_step_rows)
    print(f"{len(payloads)} messages, {total} rows, {len(steps)} steps of >= "
          f"{settings.learner_step_rows} rows; FGCNN {recipe.preset}, wide={recipe.wide}, "
          f"{settings.torch_threads} thread(s); load average {_load()}", flush=True)

    def bare_round() -> float:
        trainer = recipe.build(rows.schema_json)
        learner = trainer.learner
        model = learner.model
        prepared = []
        for idx in steps:
            r = concat_rows([batches[i] for i in idx])
            prepared.append((model.embedding.lookup(r.categorical),
                             torch.from_numpy(np.ascontiguousarray(r.dense, dtype=np.float32)),
                             torch.from_numpy(r.labels.astype(np.float32))))
        model.train()
        t, c = time.perf_counter(), time.process_time()
        for ix, x, y in prepared:
            loss = F.binary_cross_entropy_with_logits(model(ix, x), y)
            model.zero_grad(set_to_none=True)
            loss.backward()
            learner.scale_lr(min(1.0, len(y) / settings.learner_step_rows))
            learner.optimizer.step()
            learner.sparse_optimizer.step()
        return total / (time.perf_counter() - t), total / (time.process_time() - c)

    def service_round() -> float:
        with tempfile.TemporaryDirectory() as d:
            svc = LearnerService(
                LocalModelStore(d, "ranker", keep=settings.keep_versions), recipe.factory(),
                publish_every_seconds=settings.publish_every_seconds,
                publish_every_rows=settings.publish_every_rows,
                registry=CollectorRegistry(), resume=False,
                # publications every 5 s of this process's CPU time: as often per row as on
                # a dedicated core, whatever the neighbours do to the wall clock
                clock=time.process_time,
                step_rows=settings.learner_step_rows,
                step_wait_seconds=settings.learner_step_wait_seconds,
            )
            t, c = time.perf_counter(), time.process_time()
            for p in payloads:
                svc.process(p)
                svc.maybe_publish()
            svc.flush()
            rate = total / (time.perf_counter() - t), total / (time.process_time() - c)
            assert svc.trainer.rows_trained == total, svc.trainer.rows_trained
            auc = svc.trainer.metrics.snapshot()["auc"]
            print(f"    service: {svc.publications} publications, prequential AUC {auc:.4f}",
                  flush=True)
            return rate

    bare, service = [], []
    for r in range(args.rounds):
        if args.only != "service":
            bare.append(bare_round())
            print(f"round {r + 1}: bare {bare[-1][0]:,.0f} rows/s wall, {bare[-1][1]:,.0f} rows "
                  f"per CPU-second; load {_load()}", flush=True)
        if args.only != "bare":
            service.append(service_round())
            print(f"round {r + 1}: service {service[-1][0]:,.0f} rows/s wall, "
                  f"{service[-1][1]:,.0f} rows per CPU-second; load {_load()}", flush=True)
    for i, what in enumerate(("wall clock", "CPU time")):
        mb = statistics.median(x[i] for x in bare) if bare else math.nan
        ms = statistics.median(x[i] for x in service) if service else math.nan
        unit = "rows/s" if i == 0 else "rows per CPU-s"
        print(f"{what:10s}: bare {mb:8,.0f} {unit}, LearnerService {ms:8,.0f} {unit}, "
              f"service / bare {ms / mb:.1%}  (target >= 85 %, service >= 3,000 rows/s)")


if __name__ == "__main__":
    main()
