"""Rows/s of the learner service as 1 process and as a data-parallel group of N processes.

The product's own rows (``bench/pipeline_rows.py``: the worker's ``train-batches`` for a
MovieLens-100K replay, 33 categorical + 36 dense fields) are written to a fresh
``train-batches`` topic on a real broker (keyed by source partition, as the worker does);
then ``python -m headwater learner --procs N`` trains them with the default model
(FGCNN, the default preset, wide part, steps of 256 rows per member), down-sampling and the
staleness bound off so every row is trained, publications every 20,000 rows. Rank 0's ``/metrics`` counter of rows trained
(the group's) is sampled every 0.2 s; rows/s is taken between 10 % and 90 % of the rows
(start-up excluded), and the end-to-end time from launch to the last row is printed too.
Beside wall-clock rows/s it prints rows per CPU-second of the learner processes (user +
system time of every member, sampled with the counter): on a machine shared with other
jobs the wall clock measures the neighbours, the CPU time what data parallelism costs.
Variants run interleaved (``--repeat``), each against a fresh topic and model store.

    .venv/bin/python bench/learner_group.py --procs 1 2 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.pipeline_rows import pipeline_rows  # noqa: E402


def _rows_trained(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("headwater_learner_rows_trained_total "):
            return float(line.split()[1])
    return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its children (the members)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_once(procs: int, payloads: list[tuple[int, bytes]], total: int, bootstrap: str,
             redis_url: str, tmp: Path, timeout: float) -> dict:
    from kafka import KafkaProducer

    from core.settings import Settings
    from headwater.servers import free_port, stop_pid
    from streams.topics import ensure_topics

    prefix = f"b{uuid.uuid4().hex[:8]}-"
    settings = Settings(topic_prefix=prefix)
    ensure_topics(settings, bootstrap)
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 << 20,
                             linger_ms=5)
    for source_partition, payload in payloads:
        producer.send(settings.topics["train-batches"], key=str(source_partition).encode(),
                      value=payload)
    producer.flush()
    producer.close()
    port = free_port()
    run_dir = tmp / prefix
    env = dict(os.environ, HEADWATER_KAFKA=bootstrap, HEADWATER_REDIS=redis_url,
               HEADWATER_TOPIC_PREFIX=prefix, HEADWATER_STATE_DIR=str(run_dir / "state"),
               HEADWATER_MODEL_STORE=str(run_dir / "models"), HEADWATER_LEARNER_PORT=str(port),
               HEADWATER_LEARNER_PROCS=str(procs), HEADWATER_DOWNSAMPLE_BACKLOG_ROWS="0",
               HEADWATER_LEARNER_MAX_STALENESS_SECONDS="0", HEADWATER_LOG_LEVEL="WARNING",
               # publications by rows only (every 20k): a loaded machine's slow wall clock
               # must not buy one variant more publications per row than the other
               HEADWATER_PUBLISH_EVERY_SECONDS="3600", HEADWATER_PUBLISH_EVERY_ROWS="20000")
    log_path = run_dir / "learner.log"
    run_dir.mkdir(parents=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "headwater", "learner"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
    samples: list[tuple[float, float, float]] = []
    try:
        while True:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{procs} procs: {samples[-1:]} of {total} rows after {timeout}s")
            if proc.poll() is not None:
                raise RuntimeError(f"learner exited: {log_path.read_text()[-3000:]}")
            n = _rows_trained(port)
            if n is not None:
                samples.append((time.monotonic(), n, _cpu_seconds(proc.pid)))
                if n >= total:
                    break
            time.sleep(0.2)
    finally:
        stop_pid(proc.pid, timeout=30, proc=proc)

    def first_at(frac: float) -> tuple[float, float, float]:
        return next(s for s in samples if s[1] >= frac * total)

    (t1, n1, c1), (t2, n2, c2) = first_at(0.1), first_at(0.9)
    return {"procs": procs, "rows_per_s": (n2 - n1) / (t2 - t1),
            "rows_per_cpu_s": (n2 - n1) / max(1e-9, c2 - c1),
            "end_to_end_s": samples[-1][0] - t0, "load": _load()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="messages to use (0: all)")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()

    from headwater.servers import start_broker, start_redis

    rows = pipeline_rows()
    batches = rows.batches[: args.limit or None]
    payloads = [(b.source_partition, p) for b, p in zip(batches, rows.payloads, strict=False)]
    total = sum(len(b) for b in batches)
    print(f"{len(payloads)} messages, {total} rows (the worker's train-batches of a "
          f"MovieLens-100K replay); load average at start {_load()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        broker = start_broker(log_path=t / "broker.log")
        redis_server = start_redis(log_path=t / "redis.log")
        try:
            for r in range(args.repeat):
                for procs in args.procs:
                    res = run_once(procs, payloads, total, f"{broker.host}:{broker.port}",
                                   redis_server.extra["url"], t, args.timeout)
                    results.append(res)
                    print(f"round {r + 1}: {procs} process(es): {res['rows_per_s']:,.0f} rows/s "
                          f"(10-90 %), {res['rows_per_cpu_s']:,.0f} rows per CPU-second, all "
                          f"{total} rows trained {res['end_to_end_s']:.1f} s after launch; "
                          f"load average {res['load']}", flush=True)
        finally:
            redis_server.stop()
            broker.stop()
    base = [r["rows_per_s"] for r in results if r["procs"] == args.procs[0]]
    for procs in args.procs:
        mine = [r["rows_per_s"] for r in results if r["procs"] == procs]
        ratios = [m / b for m, b in zip(mine, base, strict=True)]
        cpu = [r["rows_per_cpu_s"] for r in results if r["procs"] == procs]
        print(f"{procs} process(es): rows/s {', '.join(f'{x:,.0f}' for x in mine)}; "
              f"vs {args.procs[0]} in the same round: {', '.join(f'{x:.2f}x' for x in ratios)}; "
              f"rows per CPU-second {', '.join(f'{x:,.0f}' for x in cpu)}")


if __name__ == "__main__":
    main()
