"""Throughput and latency of the detection pipeline on one core.

1. records/s through parse -> coalesce -> graph -> reduction -> baseline -> rules ->
   alerts (all corpus logs concatenated, repeated --repeat times, one engine per log
   copy as if each were a host; median of 3 runs), beside baselines measured in the
   same run: bare line splitting, parse-only, and the full pipeline without the
   learned baseline (what learning costs). The full pipeline is also reported per
   second of process CPU time, which other users of a shared machine disturb less.
2. record-arrival -> alert latency when records arrive at a steady --rate records/s
   in batches of --batch lines (simulated arrival clock, real processing time): a
   batch is processed when its last record has arrived and the engine is free;
   latency = batch processing end - arrival of the batch's first record (the
   earliest record that can have caused an alert emitted by that batch).
3. memory: tracemalloc peak of one host's engine over the whole corpus vs the
   engine's own estimate.

    .venv/bin/python bench/detection_throughput.py [--repeat 3] [--rate 10000] [--batch 100]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from detection.engine import DetectionEngine, EngineConfig  # noqa: E402
from detection.records import parse_line  # noqa: E402


def data_dir(arg):
    if arg:
        return Path(arg)
    env = os.environ.get("HEADWATER_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


def load(d: Path) -> list[list[str]]:
    return [p.read_text(encoding="utf-8").splitlines() for p in sorted((d / "audit").glob("*.log"))]


def run_split(logs, repeat):
    t = time.perf_counter()
    n = 0
    for _ in range(repeat):
        for lines in logs:
            for line in lines:
                line.split()
            n += len(lines)
    return n / (time.perf_counter() - t)


def run_parse(logs, repeat):
    t = time.perf_counter()
    n = 0
    for _ in range(repeat):
        for lines in logs:
            for line in lines:
                parse_line(line)
            n += len(lines)
    return n / (time.perf_counter() - t)


def run_full(logs, repeat, batch=1000, learn=True):
    t = time.perf_counter()
    cpu = time.process_time()
    n = alerts = 0
    for _ in range(repeat):
        for lines in logs:
            eng = DetectionEngine(host="vm", config=EngineConfig(learn=learn))
            for i in range(0, len(lines), batch):
                alerts += len(eng.process_lines(lines[i : i + batch]).alerts)
            alerts += len(eng.flush().alerts)
            n += len(lines)
    return n / (time.perf_counter() - t), alerts, n / (time.process_time() - cpu)


def median3(fn, *a):
    vals = []
    for _ in range(3):
        gc.collect()
        r = fn(*a)
        vals.append(r[0] if isinstance(r, tuple) else r)
    return statistics.median(vals)


def latency(logs, rate, batch):
    stream = [line for lines in logs for line in lines]
    eng = DetectionEngine(host="vm")
    free = 0.0
    all_lat, alert_lat = [], []
    for i in range(0, len(stream), batch):
        chunk = stream[i : i + batch]
        first_arrival = i / rate
        ready = (i + len(chunk)) / rate
        start = max(ready, free)
        t = time.perf_counter()
        res = eng.process_lines(chunk)
        end = start + (time.perf_counter() - t)
        free = end
        all_lat.append(end - first_arrival)
        if res.alerts:
            alert_lat.append(end - first_arrival)
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")  # noqa: E731
    return {
        "p50": q(all_lat, 0.5),
        "p99": q(all_lat, 0.99),
        "alert_p50": q(alert_lat, 0.5),
        "alert_p99": q(alert_lat, 0.99),
        "alert_batches": len(alert_lat),
        "backlog_s": free - len(stream) / rate,
    }


def memory(logs):
    tracemalloc.start()
    eng = DetectionEngine(host="vm")
    base = tracemalloc.get_traced_memory()[0]
    for lines in logs:
        for i in range(0, len(lines), 1000):
            eng.process_lines(lines[i : i + 1000])
    eng.flush()
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    st = eng.stats()
    return {
        "traced_bytes": cur - base,
        "peak_bytes": peak - base,
        "estimate_bytes": st["memory_bytes"],
        "nodes": st["nodes"],
        "edges_live": st["edges_live"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rate", type=float, default=10_000)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args(argv)
    logs = load(data_dir(args.data))
    if not logs:
        print("no audit logs found", file=sys.stderr)
        return 2
    nrec = sum(map(len, logs))
    print(
        f"corpus: {len(logs)} logs, {nrec} records; x{args.repeat} = {nrec * args.repeat} records per run"
    )
    run_full(logs, 1)  # warm-up: rule compilation, caches
    split = median3(run_split, logs, args.repeat)
    parse = median3(run_parse, logs, args.repeat)
    runs = []
    for _ in range(3):
        gc.collect()
        runs.append(run_full(logs, args.repeat))
    full = statistics.median(r[0] for r in runs)
    full_cpu = statistics.median(r[2] for r in runs)
    nolearn = median3(lambda *a: run_full(*a, learn=False), logs, args.repeat)
    print(f"bare line split           : {split:12,.0f} records/s")
    print(f"parse only                : {parse:12,.0f} records/s")
    print(f"full pipeline, no learning: {nolearn:12,.0f} records/s")
    print(
        f"full pipeline (detection) : {full:12,.0f} records/s  "
        f"(= {full / split:.3f} x split, {full / parse:.2f} x parse-only)"
    )
    print(f"full pipeline, per CPU-s  : {full_cpu:12,.0f} records/s  (process CPU time: "
          "what the pipeline costs whatever else runs on the machine)")
    lat = latency(logs, args.rate, args.batch)
    print(
        f"latency @ {args.rate:,.0f} rec/s, batches of {args.batch}: "
        f"all batches p50 {lat['p50'] * 1e3:.1f} ms p99 {lat['p99'] * 1e3:.1f} ms; "
        f"alert batches ({lat['alert_batches']}) p50 {lat['alert_p50'] * 1e3:.1f} ms "
        f"p99 {lat['alert_p99'] * 1e3:.1f} ms; final backlog {max(lat['backlog_s'], 0) * 1e3:.1f} ms"
    )
    mem = memory(logs)
    print(
        f"memory, one host over the whole corpus: tracemalloc {mem['traced_bytes'] / 1024:.0f} KiB "
        f"(peak {mem['peak_bytes'] / 1024:.0f} KiB), engine estimate {mem['estimate_bytes'] / 1024:.0f} KiB, "
        f"{mem['nodes']} nodes, {mem['edges_live']} live edges"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
