"""Learner rows/s in wall-clock time with the whole stack running on the same machine.

For each variant (an FGCNN preset, optionally ``:threads`` for torch's intra-op threads):
a fresh real broker and Redis, the product's services (``python -m headwater worker``,
``learner``, ``serve``) as ``headwater up`` starts them, then ``headwater replay
movielens`` (1,682 items, 72,855 click events, as fast as the broker takes them). The
learner's ``/metrics`` counter of rows trained, its CPU time and the worker's rows out
are sampled every 0.25 s until every row the worker wrote is trained. Down-sampling is
off (every row is trained, so rows/s counts full training steps); everything else is
the product's default (staleness bound, steps of >= 256 rows, publications every 5 s,
served-lag scoring, 1 torch thread unless the variant says otherwise).

Reported per run: rows/s between 10 % and 90 % of the rows; rows/s while the worker is
still writing rows (``during replay``) and after it finished (``drain``: the stack is up
and idle but for the learner); the learner's rows per CPU-second; seconds from the
start of the replay until the last row is trained; load average. Variants alternate
(``--rounds``), medians at the end.

    .venv/bin/python bench/learner_stack.py --variants stream lean --rounds 2
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.settings import Settings  # noqa: E402
from headwater.servers import free_port, start_broker, start_redis, stop_pid  # noqa: E402
from headwater.stack import spawn_service, wait_healthy  # noqa: E402


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _counter(port: int, name: str, label: str = "") -> float | None:
    """Sum of a counter's samples on a service's /metrics (those whose line has ``label``)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.split()[-1])
            found = True
    return total if found else None


def _cpu(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


def run_once(variant: str, work: Path, timeout: float) -> dict:
    preset, _, threads = variant.partition(":")
    run_dir = work / variant.replace(":", "-") / str(time.monotonic_ns())
    run_dir.mkdir(parents=True)
    broker = start_broker(log_path=run_dir / "broker.log")
    redis_server = start_redis(data_dir=run_dir / "redis", log_path=run_dir / "redis.log")
    kafka, url = f"127.0.0.1:{broker.port}", redis_server.extra["url"]
    settings = Settings(state_dir=run_dir / "state", model_store=run_dir / "state" / "models",
                        http_port=free_port(), worker_port=free_port(), learner_port=free_port(),
                        model_preset=preset, torch_threads=int(threads or 1),
                        downsample_backlog_rows=0)
    procs = {}
    try:
        for name in ("worker", "learner", "serve"):
            procs[name] = spawn_service(name, settings, kafka, url)
        wait_healthy(url, ["worker", "learner", "serving"], timeout=180)
        env = dict(os.environ, HEADWATER_KAFKA=kafka, HEADWATER_REDIS=url,
                   HEADWATER_STATE_DIR=str(settings.state_dir),
                   HEADWATER_MODEL_STORE=str(settings.model_store), HF_HUB_OFFLINE="1")
        t0 = time.monotonic()
        replay = subprocess.Popen([sys.executable, "-m", "headwater", "replay", "movielens",
                                   "--no-progress"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        samples = []  # (t, rows trained, learner CPU s, worker rows out, replay running)
        last_out, stable_since = -1.0, None
        while True:
            now = time.monotonic()
            if now - t0 > timeout:
                raise TimeoutError(f"{variant}: {samples[-1:]} after {timeout}s")
            trained = _counter(settings.learner_port, "headwater_learner_rows_trained_total")
            out = _counter(settings.worker_port, "headwater_events_out_total", "train-batches") or 0.0
            samples.append((now - t0, trained or 0.0, _cpu(procs["learner"].pid), out,
                            replay.poll() is None))
            if out != last_out:
                last_out, stable_since = out, now
            done_producing = replay.poll() is not None and now - (stable_since or now) > 3.0
            if done_producing and out and (trained or 0) >= out:
                break
            time.sleep(0.25)
        total = samples[-1][3]
        t_end = next(s[0] for s in samples if s[1] >= total)
        # the worker finished writing rows: its counter's last change
        t_out = next(s[0] for s in samples if s[3] >= total)

        def at(frac: float):
            return next(s for s in samples if s[1] >= frac * total)

        a, b = at(0.1), at(0.9)
        during = [s for s in samples if s[0] <= t_out]
        drain = [s for s in samples if s[0] >= t_out]
        first = next((s for s in samples if s[1] > 0), samples[0])
        return {
            "variant": variant, "rows": total,
            "rows_per_s": (b[1] - a[1]) / (b[0] - a[0]),
            "rows_per_cpu_s": (b[1] - a[1]) / max(1e-9, b[2] - a[2]),
            "during_replay": (during[-1][1] - first[1]) / max(1e-9, during[-1][0] - first[0]),
            "drain": (drain[-1][1] - drain[0][1]) / max(1e-9, drain[-1][0] - drain[0][0])
            if len(drain) > 1 and drain[-1][0] > drain[0][0] else float("nan"),
            "worker_done_s": t_out, "all_trained_s": t_end, "load": _load(),
        }
    finally:
        for p in procs.values():
            stop_pid(p.pid, timeout=30, proc=p)
        redis_server.stop()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["stream", "lean"],
                    help="preset[:torch threads], e.g. lean lean:2")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    # a SIGTERM (e.g. ``timeout``) unwinds through the finally blocks: no stray stacks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"load average at start {_load()}", flush=True)
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="hw-learner-stack-") as tmp:
        for r in range(args.rounds):
            for v in args.variants:
                res = run_once(v, Path(tmp), args.timeout)
                results[v].append(res)
                print(f"round {r + 1}: {v}: {res['rows']:,.0f} rows; {res['rows_per_s']:,.0f} "
                      f"rows/s (10-90 %), {res['during_replay']:,.0f} during replay, "
                      f"{res['drain']:,.0f} drain; {res['rows_per_cpu_s']:,.0f} per learner "
                      f"CPU-s; worker done at {res['worker_done_s']:.1f} s, all trained at "
                      f"{res['all_trained_s']:.1f} s; load {res['load']}", flush=True)
    print("\n| variant | rows/s (10-90 %) | during replay | drain | rows per learner CPU-s "
          "| all rows trained after replay start (s) | runs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v, res in results.items():
        def med(key: str, res: list[dict] = res) -> float:
            return statistics.median(x[key] for x in res)

        print(f"| {v} | {med('rows_per_s'):,.0f} | {med('during_replay'):,.0f} | "
              f"{med('drain'):,.0f} | {med('rows_per_cpu_s'):,.0f} | {med('all_trained_s'):.1f} "
              f"| {len(res)} |")


if __name__ == "__main__":
    main()
