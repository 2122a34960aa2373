"""Cost of the items-side code pipeline: encode -> align -> quantize, in process.

Measures, in one run on MovieLens-100K titles + genres with the real all-MiniLM-L6-v2:

- item events/s through ``encode`` alone (sentence model, cold cache) and through
  ``CodeAssigner.assign`` (encode + projection + RQ + VQ), both in batches of ``--batch``;
- p50/p99 latency from an item event to its codes being available, for a batch of
  ``--batch`` and for a single event (one item per call, the low-traffic case). The
  Redis write and the Kafka hop are measured by the lead, not here.

Every text is made unique per pass (a suffix), so the LRU cache never answers and the
sentence model does all the work; a separate figure shows the cached path.

Run: ``.venv/bin/python bench/codes_cost.py [--batch 64] [--threads 1]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Per-batch matrices here are small: multi-threaded BLAS on a shared 2-core machine was
# measured 25x slower than one thread (5.3 ms vs 0.2 ms for a 64x416 @ 416x64 pass).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.codes_service import CodeAssigner, CodesConfig  # noqa: E402
from features.content import ContentEncoder, SentenceTextEncoder  # noqa: E402
from features.movielens import load_movielens  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--singles", type=int, default=100, help="single-item calls to time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ml = load_movielens()
    ids = sorted(ml.items, key=int)

    def events(tag: str) -> list[dict]:
        return [
            {
                "item_id": f"{tag}{i}",
                "text": f"{ml.items[i]['title']} ({tag})",
                "tags": ml.items[i]["genres"],
            }
            for i in ids
        ]

    text_model = SentenceTextEncoder()
    t0 = time.perf_counter()
    text_model.encode(["warm up"])
    print(f"model load: {time.perf_counter() - t0:.1f} s")

    # Encode alone (fresh cache: every text is new).
    enc = ContentEncoder(text_model, tag_dim=32)
    evs = events("a")
    t0 = time.perf_counter()
    for s in range(0, len(evs), args.batch):
        enc.encode(evs[s : s + args.batch]).fused()
    enc_rate = len(evs) / (time.perf_counter() - t0)

    # The full pipeline: fit once on a first catalogue, then time assign on new items.
    cfg = CodesConfig(levels=3, codebook_size=64, vq_k=8)
    assigner = CodeAssigner(ContentEncoder(text_model, tag_dim=32), cfg)
    t0 = time.perf_counter()
    assigner.assign(events("fit"))
    fit_s = time.perf_counter() - t0
    d = assigner.encoder.dim
    rng = np.random.default_rng(0)
    w = np.eye(d, dtype=np.float32) + 0.01 * rng.standard_normal((d, d)).astype(np.float32)
    assigner.set_projection({"weight": w, "bias": np.zeros(d, np.float32)})
    t0 = time.perf_counter()
    res = assigner.refresh()
    refresh_s = time.perf_counter() - t0
    evs = events("b")
    lat: list[float] = []
    t0 = time.perf_counter()
    for s in range(0, len(evs), args.batch):
        b0 = time.perf_counter()
        out = assigner.assign(evs[s : s + args.batch])
        # Every event of the batch waits for the whole batch: its latency is the call's.
        lat += [time.perf_counter() - b0] * len(out)
    pipe_rate = len(evs) / (time.perf_counter() - t0)

    cached = events("b")
    t0 = time.perf_counter()
    for s in range(0, len(cached), args.batch):
        assigner.assign(cached[s : s + args.batch])
    cached_rate = len(cached) / (time.perf_counter() - t0)

    singles: list[float] = []
    for ev in events("c")[: args.singles]:
        b0 = time.perf_counter()
        assigner.assign([ev])
        singles.append(time.perf_counter() - b0)

    ms = 1e3
    print(
        f"fit on {len(ids)} items: {fit_s:.2f} s; refresh (new projection): {refresh_s:.2f} s, "
        f"{res.n_changed}/{res.n_items} items changed RQ codes"
    )
    print(f"encode only, batch {args.batch}: {enc_rate:,.0f} items/s")
    print(
        f"encode+align+quantize, batch {args.batch}: {pipe_rate:,.0f} items/s "
        f"(cached text: {cached_rate:,.0f} items/s)"
    )
    print(
        f"event->codes latency, batch {args.batch}: p50 {np.percentile(lat, 50) * ms:.1f} ms, "
        f"p99 {np.percentile(lat, 99) * ms:.1f} ms"
    )
    print(
        f"event->codes latency, single item: p50 {np.percentile(singles, 50) * ms:.1f} ms, "
        f"p99 {np.percentile(singles, 99) * ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
