"""FGCNN sizes against each other: FLOPs per row, rows/s and prequential AUC over a full replay.

Rows: the worker's ``train-batches`` messages of a whole MovieLens-100K replay
(``bench/pipeline_rows.py``: 72,855 rows, 33 categorical + 36 dense fields). Each
configuration is the recipe ``headwater learner`` builds (``trainer_settings`` over
default settings: wide part, hashed tables, served-lag AUC, steps of >= 256 rows) with
the head sizes replaced, and runs through ``LearnerService.process`` on the Arrow
payloads (decode, accumulation, test-then-train, metrics, publications into a real
store): the learner loop minus Kafka. The service's clock is virtual (rows arrive at
``--rate`` rows/s), so every configuration publishes after the same rows and the
served-lag AUC (scores of the last publication serving would run) compares like for like. Reported per configuration: forward and training
MFLOP per row (``torch.utils.flop_counter`` on one step of 256 rows), rows/s wall and
per CPU-second of this process, GFLOP/s the step achieves, and the exact prequential
AUC (every row scored before it is trained on) over all rows and over the last 20 %.
Configurations run interleaved for ``--rounds`` rounds (the AUC is the same every round:
same seed, same rows); rates are medians. ``--threads`` sets torch's intra-op threads.

    .venv/bin/python bench/learner_configs.py --configs stream lean --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline_rows import pipeline_rows  # noqa: E402
from core.settings import Settings  # noqa: E402
from learner.metrics import exact_auc  # noqa: E402
from learner.models.fgcnn import PRESETS  # noqa: E402
from learner.protocol import Rows  # noqa: E402
from learner.service import LearnerService  # noqa: E402
from learner.store import LocalModelStore  # noqa: E402
from streams.learner_runner import trainer_settings  # noqa: E402

#: extra candidates beside the presets: name -> (preset, head overrides)
CANDIDATES: dict[str, tuple[str, dict]] = {
    "stream-mlp128": ("stream", {"mlp": [128]}),
    "stream-rc1": ("stream", {"recombination": [1, 1]}),
}


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _recipe(name: str, settings: Settings):
    base = trainer_settings(settings)
    if name in PRESETS:
        return dataclasses.replace(base, preset=name, head={})
    preset, head = CANDIDATES[name]
    return dataclasses.replace(base, preset=preset, head=dict(head))


def flops_per_row(recipe, rows) -> tuple[float, float]:
    """(forward, training step) FLOPs per row on the first 256 rows."""
    c = rows.columns()
    b = Rows(c["categorical"][:256], c["dense"][:256], c["labels"][:256])
    learner = recipe.build(rows.schema_json).learner
    with FlopCounterMode(display=False) as fc:
        learner.learn_many(b)
    train = fc.get_total_flops() / 256
    with FlopCounterMode(display=False) as fc:
        learner.predict_proba_many(b)
    return fc.get_total_flops() / 256, train


def run(recipe, rows, settings: Settings, rate: float) -> dict:
    seen = [0]

    def clock() -> float:
        # virtual time: rows handed to the service at ``rate`` rows/s, so publications
        # (every 5 s) and serving's load delay (1 s) fall on the same rows for every
        # configuration, whatever the machine's load does to the wall clock
        return seen[0] / rate

    with tempfile.TemporaryDirectory() as d:
        svc = LearnerService(
            LocalModelStore(d, "ranker", keep=settings.keep_versions), recipe.factory(),
            publish_every_seconds=settings.publish_every_seconds,
            publish_every_rows=settings.publish_every_rows,
            registry=CollectorRegistry(), resume=False, clock=clock,
            step_rows=settings.learner_step_rows,
            step_wait_seconds=settings.learner_step_wait_seconds,
        )
        labels, scores = [], []

        def keep(res) -> None:
            if res is not None and res.rows_scored:
                labels.append(np.asarray(res.labels))
                scores.append(res.scores)

        t, c = time.perf_counter(), time.process_time()
        for p, b in zip(rows.payloads, rows.batches, strict=True):
            seen[0] += len(b)
            keep(svc.process(p))
            svc.maybe_publish()
        keep(svc.flush())
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        total = svc.trainer.rows_trained
        y, s = np.concatenate(labels), np.concatenate(scores)
        tail = int(len(y) * 0.8)
        return {"rows": total, "rows_per_s": total / wall, "rows_per_cpu_s": total / cpu,
                "auc": exact_auc(y, s), "auc_last20": exact_auc(y[tail:], s[tail:]),
                "served_auc": svc.trainer.served.metrics.snapshot()["auc"],
                "publications": svc.publications}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["stream", "lean"],
                    help=f"presets {sorted(PRESETS)} or {sorted(CANDIDATES)}")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="messages (0: the whole replay)")
    ap.add_argument("--rate", type=float, default=3000.0,
                    help="rows/s of the virtual clock that times publications")
    args = ap.parse_args()
    logging.getLogger("learner").setLevel(logging.ERROR)  # drift warnings: not the point here
    settings = Settings()
    torch.set_num_threads(args.threads)
    rows = pipeline_rows()
    if args.limit:
        rows = dataclasses.replace(rows, payloads=rows.payloads[: args.limit],
                                   batches=rows.batches[: args.limit])
    recipes = {}
    for name in args.configs:
        recipes[name] = dataclasses.replace(_recipe(name, settings), num_threads=args.threads)
    flops = {name: flops_per_row(r, rows) for name, r in recipes.items()}
    print(f"{len(rows.payloads)} messages, {sum(len(b) for b in rows.batches)} rows; "
          f"{args.threads} torch thread(s); load average {_load()}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in recipes}
    for r in range(args.rounds):
        for name, recipe in recipes.items():
            res = run(recipe, rows, settings, args.rate)
            results[name].append(res)
            print(f"round {r + 1}: {name}: {res['rows_per_s']:,.0f} rows/s wall, "
                  f"{res['rows_per_cpu_s']:,.0f} per CPU-s, prequential AUC {res['auc']:.4f}, "
                  f"last 20 % {res['auc_last20']:.4f}; load {_load()}", flush=True)
    print("\n| config | head | forward MFLOP/row | train MFLOP/row | rows/s wall | "
          "rows per CPU-s | GFLOP/s (CPU) | prequential AUC | last-20 % AUC | served-lag AUC |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, res in results.items():
        fwd, train = flops[name]
        wall = statistics.median(x["rows_per_s"] for x in res)
        cpu = statistics.median(x["rows_per_cpu_s"] for x in res)
        head = {**PRESETS[recipes[name].preset], **recipes[name].head}
        brief = (f"k={head['embedding_dim']} ch={head['channels']} rc={head['recombination']} "
                 f"mlp={head['mlp']}")
        print(f"| {name} | {brief} | {fwd / 1e6:.2f} | {train / 1e6:.2f} | {wall:,.0f} | "
              f"{cpu:,.0f} | {train * cpu / 1e9:.1f} | {res[0]['auc']:.4f} | "
              f"{res[0]['auc_last20']:.4f} | {res[0]['served_auc']:.4f} |")


if __name__ == "__main__":
    main()
