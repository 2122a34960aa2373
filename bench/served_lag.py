"""Served-lag AUC: what the model that serving runs scores, through the learner service.

Feeds the worker's own MovieLens rows (``bench/pipeline_rows.py``) to
``LearnerService.process`` one small message at a time, on a simulated clock that
advances ``1 / rate`` seconds per row (a live stream at ``--rate`` events/s). The
service accumulates steps (``--step-rows`` / ``--step-wait``), publishes every
``--publish-every`` seconds, and its :class:`~learner.trainer.ServedLag` scores every row
with the snapshot serving would be running (published, then loaded ``--serve-delay`` s
later) before the learner trains on it. Reported over the last 20 % of rows (the rows
``bench/served_movielens.py`` scores through ``/v1/score``) and over all rows:

* prequential AUC (live weights, test-then-train), the learner's own figure;
* served-lag AUC (the published snapshot), what users get;
* item smoothed CTR (the row's ``item_ctr_total``): the popularity baseline.

Only the model store is replaced (checkpoints are not written: hundreds of
publications); everything else is the service's code path.

    .venv/bin/python bench/served_lag.py --variant all --rate 26
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline_rows import pipeline_rows  # noqa: E402
from learner.batch import encode_batch  # noqa: E402
from learner.metrics import exact_auc  # noqa: E402
from learner.service import LearnerService  # noqa: E402
from learner.store import LocalModelStore  # noqa: E402
from learner.trainer import TrainerSettings  # noqa: E402


class _NullStore(LocalModelStore):
    """Counts publications without writing checkpoints (the simulation publishes hundreds)."""

    def __init__(self, root: str) -> None:
        super().__init__(root, "ranker")
        self.n = 0

    def latest_good(self, expected_schema_hash: str | None = None) -> str | None:
        return None

    def publish(self, state: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        self.n += 1
        return {"version": f"{self.n:06d}", "path": ""}


# name -> (service kwargs, trainer settings overrides)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # what ran before: one optimizer step per message, whatever its size
    "per-message": ({"step_rows": 1, "step_wait_seconds": 0.0}, {}),
    # steps of up to 256 rows or 2 s, learning rates scaled to the step's size
    "accumulate": ({"step_rows": 256, "step_wait_seconds": 2.0}, {"reference_rows": 256}),
    # ... plus standardised dense counters and a wide (linear) part beside the head
    "wide": ({"step_rows": 256, "step_wait_seconds": 2.0},
             {"reference_rows": 256, "dense_norm": True, "wide": True}),
    "wide-per-message": ({"step_rows": 1, "step_wait_seconds": 0.0},
                         {"dense_norm": True, "wide": True}),
    # the product's default: "wide" on the smaller "stream" FGCNN preset
    "wide-stream": ({"step_rows": 256, "step_wait_seconds": 2.0},
                    {"reference_rows": 256, "dense_norm": True, "wide": True,
                     "preset": "stream"}),
}


def encode_rows(cols: dict[str, np.ndarray], schema_json: str, schema_hash: str,
                msg_rows: int) -> list[bytes]:
    import json

    schema = json.loads(schema_json)
    cat, dense = schema["categorical"], schema["dense"]
    out = []
    n = len(cols["labels"])
    for s in range(0, n, msg_rows):
        sl = slice(s, min(n, s + msg_rows))
        # rows of one message must share a partition: the simulation keeps each row's own
        # partition and offset, so a message of several rows takes the first row's
        part = int(cols["partition"][s])
        same = cols["partition"][sl] == part
        idx = np.arange(sl.start, sl.stop)[same]
        c = {
            "event_id": cols["event_id"][idx].astype(str),
            "ts": cols["ts"][idx],
            "label": cols["labels"][idx].astype(np.int8),
            "offset": cols["offset"][idx],
            "sub": cols["sub"][idx].astype(np.int32),
        }
        c |= {f"c:{f}": cols["categorical"][idx, j] for j, f in enumerate(cat)}
        c |= {f"d:{d}": cols["dense"][idx, j] for j, d in enumerate(dense)}
        off = cols["offset"][idx]
        out.append(encode_batch(c, schema_json, schema_hash, "clicks", part, int(off.min()),
                                int(off.max()) + 1))
        for j in np.arange(sl.start, sl.stop)[~same]:  # stragglers of other partitions
            out.extend(encode_rows({k: v[j:j + 1] for k, v in cols.items()}, schema_json,
                                   schema_hash, 1))
    return out


def run(name: str, payloads: list[bytes], index: list[np.ndarray], n: int, args,
        settings: TrainerSettings, service_kw: dict[str, Any]) -> dict[str, Any]:
    now = [0.0]
    with tempfile.TemporaryDirectory() as tmp:
        svc = LearnerService(
            _NullStore(tmp), settings.factory(), publish_every_seconds=args.publish_every,
            clock=lambda: now[0], resume=False, **service_kw,
        )
        prequential = np.full(n, np.nan)
        pending: list[np.ndarray] = []
        stepped: list[np.ndarray] = []
        t0 = time.perf_counter()
        for payload, rows in zip(payloads, index, strict=True):
            now[0] = float(rows[-1] + 1) / args.rate
            res = svc.tick()
            if res is not None:
                got = np.concatenate(pending)
                pending = []
                prequential[got] = res.scores
                stepped.append(got)
            pending.append(rows)
            res = svc.process(payload)
            if res is not None:
                got = np.concatenate(pending)
                pending = []
                prequential[got] = res.scores
                stepped.append(got)
            svc.maybe_publish()
        res = svc.flush()
        if res is not None:
            got = np.concatenate(pending)
            prequential[got] = res.scores
            stepped.append(got)
        wall = time.perf_counter() - t0
        served = svc.trainer.served
    served_scores = np.full(n, np.nan)
    served_scores[np.concatenate(stepped)] = np.concatenate(served.history)
    return {"name": name, "prequential": prequential, "served": served_scores, "wall": wall,
            "steps": svc.trainer.batches, "publications": svc.publications}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="all", help=f"one of {sorted(VARIANTS)} or all")
    ap.add_argument("--rate", type=float, default=26.0, help="live events/s (simulated clock)")
    ap.add_argument("--msg-rows", type=int, default=1, help="rows per train-batches message")
    ap.add_argument("--publish-every", type=float, default=5.0)
    ap.add_argument("--serve-delay", type=float, default=1.0)
    ap.add_argument("--kind", default="fgcnn")
    ap.add_argument("--preset", default="compact")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("learner").setLevel(logging.ERROR)  # per-step drift warnings

    rows = pipeline_rows()
    cols = rows.columns()
    if args.limit:
        cols = {k: v[:args.limit] for k, v in cols.items()}
    n = len(cols["labels"])
    schema_json = rows.schema_json
    schema_hash = rows.batches[0].schema_hash
    payloads = encode_rows(cols, schema_json, schema_hash, args.msg_rows)
    # which rows each payload carries, in the order the service will see them
    pos = {(int(p), int(o), int(s)): i for i, (p, o, s) in
           enumerate(zip(cols["partition"], cols["offset"], cols["sub"], strict=True))}
    from learner.batch import decode_batch

    index = []
    for p in payloads:
        b = decode_batch(p)
        index.append(np.array([pos[(b.source_partition, int(o), int(s))]
                               for o, s in zip(b.offsets, b.subs, strict=True)]))
    y = cols["labels"].astype(int)
    test = np.arange(n) >= int(0.8 * n)
    ctr = cols["dense"][:, rows.batches[0].dense_names.index("item_ctr_total")]
    print(f"{n} rows, {len(payloads)} messages, live rate {args.rate:g}/s, publication every "
          f"{args.publish_every:g} s, served {args.serve_delay:g} s after publication")
    print(f"item-CTR baseline: all {exact_auc(y, ctr):.4f}  last-20% {exact_auc(y[test], ctr[test]):.4f}")
    names = sorted(VARIANTS) if args.variant == "all" else args.variant.split(",")
    print("| variant | steps | publications | prequential all | served all | prequential last-20% "
          "| served last-20% | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        service_kw, overrides = VARIANTS[name]
        settings = TrainerSettings(**{"kind": args.kind, "preset": args.preset, "seed": args.seed,
                                      "num_threads": args.threads, "n_thresholds": 50,
                                      "served_lag": {"delay": args.serve_delay, "record": True},
                                      **overrides})
        r = run(name, payloads, index, n, args, settings, service_kw)
        pq, sv = r["prequential"], r["served"]
        ok = ~np.isnan(sv)
        print(f"| {name} | {r['steps']} | {r['publications']} | {exact_auc(y, pq):.4f} | "
              f"{exact_auc(y[ok], sv[ok]):.4f} | {exact_auc(y[test], pq[test]):.4f} | "
              f"{exact_auc(y[test & ok], sv[test & ok]):.4f} | {r['wall']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
