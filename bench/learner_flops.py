"""FLOPs per row and achieved GFLOP/s of the ranker presets on the product's own rows.

Rows are the worker's ``train-batches`` rows of a MovieLens-100K replay
(``bench/pipeline_rows.py``: 33 categorical + 36 dense fields). For each preset (and
with / without the wide part) it counts FLOPs with ``torch.utils.flop_counter`` for one
forward and one training step (``TorchLearner.learn_many``: forward, backward, Adam and
SparseAdam), then times ``--steps`` training steps of ``--batch`` rows, the bare step
the learner service runs. It says whether the arithmetic alone allows a target rate.

    .venv/bin/python bench/learner_flops.py --threads 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline_rows import pipeline_rows  # noqa: E402
from learner.protocol import Rows  # noqa: E402
from learner.trainer import TrainerSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--presets", default="compact,stream")
    ap.add_argument("--target", type=float, default=3000.0, help="rows/s the learner must reach")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("learner").setLevel(logging.ERROR)
    rows = pipeline_rows()
    c = rows.columns()
    n = args.batch

    def batch(i: int) -> Rows:
        s = (i * n) % (len(c["labels"]) - n)
        return Rows(c["categorical"][s:s + n], c["dense"][s:s + n], c["labels"][s:s + n])

    print(f"{len(c['labels'])} rows, {c['categorical'].shape[1]} categorical + "
          f"{c['dense'].shape[1]} dense fields; batch {n}, {args.threads} thread(s)")
    print("| preset | wide | forward MFLOP/row | train MFLOP/row | rows/s | GFLOP/s | "
          f"GFLOP/s needed for {args.target:g} rows/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for preset in args.presets.split(","):
        for wide in (False, True):
            learner = TrainerSettings(preset=preset, dense_norm=wide, wide=wide,
                                      num_threads=args.threads).build(rows.schema_json).learner
            with FlopCounterMode(display=False) as fc:
                learner.learn_many(batch(0))
            train = fc.get_total_flops() / n
            with FlopCounterMode(display=False) as fc:
                learner.predict_proba_many(batch(1))
            fwd = fc.get_total_flops() / n
            for i in range(3):  # warm-up
                learner.learn_many(batch(i))
            t0 = time.perf_counter()
            for i in range(args.steps):
                learner.learn_many(batch(i + 3))
            rate = args.steps * n / (time.perf_counter() - t0)
            print(f"| {preset} | {wide} | {fwd / 1e6:.2f} | {train / 1e6:.2f} | {rate:,.0f} | "
                  f"{train * rate / 1e9:.1f} | {train * args.target / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
