"""Benchmark: scoring latency while a new model is published every second (hot swap).

Same stack and load as ``bench/serving_load.py`` (real broker, real Redis, ``python -m
headwater serve`` as its own process). Windows alternate: a baseline window with no
publication, then a swap window during which a publisher thread does what the learner
does every ``--interval`` seconds: perturb the weights, ``ModelStore.publish`` (atomic
rename) and announce the manifest on ``model-updates``. Serving loads each version
beside the serving one on its loader thread, verifies, warms and swaps it.

Reported: failed requests (must be 0), versions served, p50/p99 with and without swaps
(medians over ``--rounds``) and their ratio (target: p99 ratio ≤ 1.5), server-side swap
count and swap time.

    .venv/bin/python bench/serving_swap.py [--kind deepfm] [--seconds 60] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from serving_load import (  # noqa: E402
    environment,
    make_bodies,
    make_model,
    publish,
    run_load,
    scrape,
    seed_redis,
    start_serving,
    start_stack,
)


class Publisher(threading.Thread):
    """Publish a perturbed model every ``interval`` seconds and announce it, like the learner."""

    def __init__(self, stack, model, interval: float) -> None:
        super().__init__(daemon=True)
        self.stack, self.model, self.interval = stack, model, interval
        self.stop = threading.Event()
        self.published: list[str] = []
        self.publish_seconds: list[float] = []

    def run(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(
            bootstrap_servers=self.stack.kafka, acks=1, enable_idempotence=False, linger_ms=0
        )
        topic = self.stack.settings.topics["model-updates"]
        try:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                with torch.no_grad():
                    for p in self.model.parameters():
                        p.add_(torch.randn_like(p), alpha=1e-3)
                m = publish(self.stack, self.model, len(self.published) + 1)
                producer.send(topic, key=m["model"].encode(), value=json.dumps(m).encode())
                producer.flush(10)
                self.published.append(m["version"])
                self.publish_seconds.append(time.perf_counter() - t0)
                self.stop.wait(max(0.0, self.interval - (time.perf_counter() - t0)))
        finally:
            producer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="deepfm", choices=["fgcnn", "ipnn", "deepfm", "lr"])
    ap.add_argument("--buckets", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each window")
    ap.add_argument("--rounds", type=int, default=1, help="baseline + swap window pairs")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between publications")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=1600)
    ap.add_argument("--events", type=int, default=40_000)
    args = ap.parse_args()

    torch.set_num_threads(1)
    stack = start_stack()
    try:
        seed_redis(stack, args.users, args.items, args.events)
        model = make_model(stack.builder, args.kind, args.buckets, 0)
        first = publish(stack, model, 0)
        start_serving(stack)
        bodies = make_bodies(500, args.candidates, args.users, args.items)
        asyncio.run(run_load(stack.base, bodies, args.concurrency, 2.0))  # warm-up
        base_runs, swap_runs, pubs = [], [], []
        for r in range(args.rounds):
            base_runs.append(
                asyncio.run(run_load(stack.base, bodies, args.concurrency, args.seconds))
            )
            pub = Publisher(stack, model, args.interval)
            before = scrape(stack.base)
            pub.start()
            swap_runs.append(
                asyncio.run(run_load(stack.base, bodies, args.concurrency, args.seconds))
            )
            pub.stop.set()
            pub.join()
            time.sleep(1.5)
            after = scrape(stack.base)
            pubs.append((pub, before, after))
            b, s = base_runs[-1], swap_runs[-1]
            print(
                f"round {r + 1}: baseline {b.rps:.0f} req/s p99 {b.pct(99):.1f} ms | swaps "
                f"{s.rps:.0f} req/s p99 {s.pct(99):.1f} ms | published {len(pub.published)} | "
                f"errors {b.errors}+{s.errors}",
                flush=True,
            )

        def med(runs, f):
            return statistics.median(f(r) for r in runs)

        p99_b, p99_s = med(base_runs, lambda r: r.pct(99)), med(swap_runs, lambda r: r.pct(99))
        p50_b, p50_s = med(base_runs, lambda r: r.pct(50)), med(swap_runs, lambda r: r.pct(50))
        errors = sum(r.errors for r in base_runs + swap_runs)
        published = sum(len(p.published) for p, _, _ in pubs)
        swaps = sum(
            a.get("headwater_model_swaps_total", 0) - b.get("headwater_model_swaps_total", 0)
            for _, b, a in pubs
        )
        swap_sum = sum(
            a.get("headwater_model_swap_seconds_sum", 0)
            - b.get("headwater_model_swap_seconds_sum", 0)
            for _, b, a in pubs
        )
        failures = sum(
            sum(v for k, v in a.items() if k.startswith("headwater_model_load_failures_total"))
            for _, _, a in pubs
        )
        served_versions = sorted({v for r in swap_runs for v in r.versions})
        published_set = {first["version"]} | {v for p, _, _ in pubs for v in p.published}
        bad = [v for v in served_versions if v not in published_set]
        pub_s = statistics.median(s for p, _, _ in pubs for s in p.publish_seconds)
        print()
        print(
            f"{environment()}; model {args.kind} ({first['bytes'] / 1e6:.1f} MB checkpoint), "
            f"{args.candidates} candidates, concurrency {args.concurrency}, {args.rounds} round(s) of "
            f"{args.seconds:g}s baseline + {args.seconds:g}s with a publication every {args.interval:g}s"
        )
        print()
        print("| window | req/s | p50 ms | p99 ms | failed requests |")
        print("|---|---:|---:|---:|---:|")
        print(
            f"| no swaps (baseline) | {med(base_runs, lambda r: r.rps):,.0f} | {p50_b:.1f} | {p99_b:.1f} | "
            f"{sum(r.errors for r in base_runs)} |"
        )
        print(
            f"| publication every {args.interval:g}s | {med(swap_runs, lambda r: r.rps):,.0f} | {p50_s:.1f} | "
            f"{p99_s:.1f} | {sum(r.errors for r in swap_runs)} |"
        )
        print()
        print(
            f"p99 ratio swaps/baseline: {p99_s / p99_b:.2f} (target <= 1.5); p50 ratio {p50_s / p50_b:.2f}"
        )
        print(
            f"published {published} versions (median {pub_s * 1000:.0f} ms each to write + announce); "
            f"server swapped {swaps:.0f} times, mean load-verify-warm {swap_sum / max(swaps, 1) * 1000:.0f} ms, "
            f"load failures {failures:.0f}; {len(served_versions)} distinct versions answered requests; "
            f"versions never published in answers: {bad}; failed requests total: {errors}"
        )
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
