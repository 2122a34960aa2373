"""Learner throughput: ``LearnerService.process`` (decode + dedup + score + train) beside
the bare torch training step of the same model and optimizers on the same batches, in the same run;
plus the cost of a publication (seconds, bytes).

Rows are the worker's own rows of a MovieLens-100K replay (``bench/pipeline_rows.py``,
cached under ``artifacts/``), as ``bench/learner_movielens.py`` loads them. The bare step
gets pre-built index/dense tensors and does forward + log-loss + backward + Adam; the
service gets the Arrow payloads. Rounds alternate between the two; medians are reported.

    .venv/bin/python bench/learner_throughput.py --batch 256 --rounds 3
"""

from __future__ import annotations

import argparse
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

from bench.learner_movielens import load_rows  # noqa: E402
from learner.batch import encode_batch  # noqa: E402
from learner.service import LearnerService  # noqa: E402
from learner.store import LocalModelStore  # noqa: E402
from learner.trainer import TrainerSettings  # noqa: E402


def payloads_for(schema, tokens, dense, labels, ts, batch, start, count):
    out = []
    for b in range(count):
        s = start + b * batch
        sl = slice(s, s + batch)
        n = len(labels[sl])
        cols = {
            "event_id": np.array([f"r{s + j}" for j in range(n)]),
            "ts": ts[sl],
            "label": labels[sl],
            "offset": np.arange(s, s + n, dtype=np.int64),
            "sub": np.zeros(n, dtype=np.int32),
        }
        cols |= {f"c:{f}": tokens[sl, j] for j, f in enumerate(schema.categorical)}
        cols |= {f"d:{d}": dense[sl, j] for j, d in enumerate(schema.dense)}
        out.append(encode_batch(cols, schema.to_json(), schema.hash, "clicks", 0, s, s + n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40, help="batches per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="compact")
    ap.add_argument("--publishes", type=int, default=5)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    rows = load_rows()
    schema, tokens, dense, labels, ts = rows.schema, rows.tokens, rows.dense, rows.labels, rows.ts
    settings = TrainerSettings(preset=args.preset, num_threads=args.threads)
    n_rows = args.batch * args.batches
    payloads = payloads_for(schema, tokens, dense, labels, ts, args.batch, 0, args.batches)

    # bare step: same model, same batches, tensors prepared outside the timed loop
    bare_trainer = settings.build(schema.to_json())
    model = bare_trainer.learner.model
    # the same optimizers the learner uses: Adam for the network, SparseAdam for tables
    opt, sparse_opt = bare_trainer.learner.optimizer, bare_trainer.learner.sparse_optimizer
    prepared = []
    for b in range(args.batches):
        sl = slice(b * args.batch, (b + 1) * args.batch)
        prepared.append(
            (
                model.embedding.lookup(tokens[sl]),
                torch.from_numpy(dense[sl]),
                torch.from_numpy(labels[sl].astype(np.float32)),
            )
        )

    def bare_round() -> float:
        model.train()
        t = time.perf_counter()
        for rows, x, y in prepared:
            loss = F.binary_cross_entropy_with_logits(model(rows, x), y)
            model.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sparse_opt.step()
        return n_rows / (time.perf_counter() - t)

    def service_round() -> float:
        with tempfile.TemporaryDirectory() as d:
            svc = LearnerService(
                LocalModelStore(d),
                settings.factory(),
                publish_every_seconds=None,
                registry=CollectorRegistry(),
                resume=False,
            )
            svc.process(payloads[0])  # builds the model: not part of steady state
            t = time.perf_counter()
            for p in payloads[1:]:
                svc.process(p)
            return (n_rows - args.batch) / (time.perf_counter() - t)

    bare, svc = [], []
    bare_round()  # warm-up
    for _ in range(args.rounds):
        bare.append(bare_round())
        svc.append(service_round())
    mb, ms = statistics.median(bare), statistics.median(svc)
    print(
        f"model FGCNN {args.preset}, {len(schema.categorical)} fields, batch {args.batch}, "
        f"{args.threads} thread(s), {args.rounds} rounds of {args.batches} batches"
    )
    print(f"bare torch step          : {mb:8.0f} rows/s  (rounds {[round(b) for b in bare]})")
    print(f"LearnerService.process   : {ms:8.0f} rows/s  (rounds {[round(s) for s in svc]})")
    print(f"service / bare           : {ms / mb:.1%}")

    with tempfile.TemporaryDirectory() as d:
        store = LocalModelStore(d, keep=2)
        s = LearnerService(
            store,
            settings.factory(),
            publish_every_seconds=None,
            registry=CollectorRegistry(),
            resume=False,
        )
        secs, sizes = [], []
        for i, p in enumerate(payloads[: args.publishes]):
            s.process(p)
            t = time.perf_counter()
            m = s.publish()
            secs.append(time.perf_counter() - t)
            sizes.append(m["bytes"])
            assert i + 1 == int(m["version"])
        print(
            f"publish                  : median {statistics.median(secs) * 1000:.0f} ms, "
            f"{statistics.median(sizes) / 1e6:.1f} MB per version (model.pt incl. Adam state)"
        )


if __name__ == "__main__":
    main()
