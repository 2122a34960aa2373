"""Benchmark: time from producing a click to the first response scored by a model trained on it.

Runs against the real stack: for each mode of ``--deltas`` (``off``: full checkpoints
only, every ``HEADWATER_PUBLISH_EVERY_SECONDS``; ``on``: plus a delta publication every
``--delta-every`` seconds, ``HEADWATER_DELTA_EVERY_SECONDS``), in the same run and
alternating ``--rounds`` times, it starts its own stack with ``headwater up`` (throwaway
state dir and model store in a ``hw-freshness-*`` temporary directory, free ports), stops it
with ``headwater down`` and deletes that directory (``--keep``: keeps it);
``--existing`` measures the stack the current ``HEADWATER_*`` settings point at instead
(one mode: whatever it runs). Under load: ``headwater replay movielens --rate R --live``
runs in the background the whole time (``--rate 0``: no background replay, a warm-up
replay of ``--warmup`` clicks instead). Once serving is ready, ``--clicks`` times:
produce one click to the clicks topic (noting its partition and offset), and poll
``POST /v1/score`` every ``--poll`` seconds. A response counts when its
``model_version``'s manifest has a watermark past that offset for that partition (the
learner saves "next row to train" per source partition in every publication).
Reported per mode: p50, p99 and max of click → first such response, plus its parts
(→ the click's row first seen on train-batches, → version published, published →
served, and serving's load time of those versions), and what the publications cost (learner
seconds per publication, bytes, from the learner's metrics and the manifests).

    .venv/bin/python bench/serving_freshness.py --clicks 20 --rate 200 --deltas off,on
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import Settings  # noqa: E402
from headwater.servers import free_port  # noqa: E402
from learner.model_stores import open_model_store  # noqa: E402
from learner.store import CheckpointError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = {"off": "0", "on": None}  # on: --delta-every


def cli(env: dict, *args: str, timeout: float = 600, check: bool = True) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "headwater", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"headwater {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def http_json(url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, dict]:
    req = urllib.request.Request(
        url,
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def trained_past(manifest: dict, topics: list[str], partition: int, offset: int) -> bool:
    wms = manifest.get("watermarks") or {}
    for t in topics:
        wm = wms.get(f"{t}:{partition}")
        # The watermark is the next (offset, sub) not yet trained: the click's row
        # (offset, 0) is trained once the watermark is past it.
        if wm is not None and (int(wm["offset"]), int(wm["sub"])) > (offset, 0):
            return True
    return False


def learner_metric(url: str, name: str) -> tuple[float, float]:
    """``(sum, count)`` of a histogram on the learner's metrics endpoint (0s if absent)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0.0, 0.0
    out = []
    for part in ("sum", "count"):
        m = re.search(rf"^{name}_{part} ([0-9.e+-]+)$", text, re.M)
        out.append(float(m.group(1)) if m else 0.0)
    return out[0], out[1]


def follow_updates(kafka: str, topic: str, out: dict, stop: threading.Event) -> None:
    """Record every manifest announced on ``topic`` (from the beginning) until ``stop``."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=kafka, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=20)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=100).values():
                for rec in records:
                    try:
                        m = json.loads(rec.value)
                        out[str(m["version"])] = m
                    except (ValueError, KeyError, TypeError):
                        continue
    finally:
        consumer.close()


def follow_batches(kafka: str, topic: str, seen: dict, stop: threading.Event) -> None:
    """Record when each event id first shows up in a ``topic`` message (from now on)."""
    from kafka import KafkaConsumer, TopicPartition

    from learner.batch import decode_batch

    consumer = KafkaConsumer(bootstrap_servers=kafka, group_id=None, enable_auto_commit=False,
                             fetch_max_wait_ms=20)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_end(*tps)
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=100).values():
                now = time.time()
                for rec in records:
                    try:
                        ids = decode_batch(rec.value).event_ids
                    except Exception:  # noqa: BLE001 - not a batch this bench reads
                        continue
                    for e in ids:
                        seen.setdefault(str(e), now)
    finally:
        consumer.close()


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (with few samples, p99 is the maximum)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(-(-q * len(xs) // 100)) - 1))]


def measure(args: argparse.Namespace, env: dict, own_stack: bool) -> dict:
    """Up a stack (unless ``--existing``), load it, time ``--clicks`` clicks, down it."""
    tmp = None
    replay = None
    if own_stack:
        tmp = Path(tempfile.mkdtemp(prefix="hw-freshness-"))
        env.update(
            HEADWATER_STATE_DIR=str(tmp / "state"),
            HEADWATER_MODEL_STORE=str(tmp / "models"),
            HEADWATER_KAFKA_PORT="0",
            HEADWATER_REDIS_PORT="0",
            HEADWATER_HTTP_PORT=str(free_port()),
            HEADWATER_WORKER_PORT=str(free_port()),
            HEADWATER_LEARNER_PORT=str(free_port()),
        )
        env.pop("HEADWATER_KAFKA", None)
        env.pop("HEADWATER_REDIS", None)
        print(cli(env, "up", timeout=300), flush=True)
    try:
        status = json.loads(cli(env, "status", "--json", check=False))
        kafka = status["kafka"]["address"]
        settings = Settings(
            **{
                k[len("HEADWATER_") :].lower(): v
                for k, v in env.items()
                if k.startswith("HEADWATER_")
                and k[len("HEADWATER_") :].lower() in Settings.model_fields
            }
        )
        base = f"http://{settings.bind_host}:{settings.http_port}"
        metrics_url = f"http://{settings.bind_host}:{settings.learner_port}/metrics"
        store = open_model_store(settings)  # a directory or a bucket
        clicks_topic = settings.topics["clicks"]

        t0 = time.time()
        if args.rate > 0:
            replay = subprocess.Popen(
                [sys.executable, "-m", "headwater", "replay", "movielens", "--rate",
                 str(args.rate), "--limit", str(int(args.rate * 3600)), "--live", "--no-progress",
                 "--wait-items", str(args.wait_items)],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
        else:
            print(cli(env, "replay", "movielens", "--limit", str(args.warmup), "--no-progress",
                      "--wait-items", str(args.wait_items)), flush=True)
        while http_json(f"{base}/readyz")[0] != 200 or (
            http_json(f"{base}/v1/models")[1].get("serving") in (None, "baseline")
        ):
            if time.time() - t0 > 600:
                raise RuntimeError("serving never became ready (no model published?)")
            if replay is not None and replay.poll() is not None:
                raise RuntimeError(f"background replay ended: {replay.stderr.read()}")
            time.sleep(0.5)
        print(f"serving a trained model {time.time() - t0:.1f}s after the replay began", flush=True)
        time.sleep(args.settle)
        cost0 = {n: learner_metric(metrics_url, n) for n in
                 ("headwater_learner_publish_seconds", "headwater_learner_delta_seconds")}

        from kafka import KafkaProducer

        producer = KafkaProducer(
            bootstrap_servers=kafka, acks=1, enable_idempotence=False, linger_ms=0
        )
        manifests: dict[str, dict] = {}
        # Manifests as announced on model-updates: a delta of a superseded base can leave
        # the store (retention) while serving still answers with it.
        announced: dict[str, dict] = {}
        stop_watch = threading.Event()
        watch = threading.Thread(target=follow_updates, daemon=True, args=(
            kafka, settings.topics["model-updates"], announced, stop_watch))
        watch.start()
        batched: dict[str, float] = {}  # event id -> first seen on train-batches
        batches = threading.Thread(target=follow_batches, daemon=True, args=(
            kafka, settings.topics["train-batches"], batched, stop_watch))
        batches.start()
        time.sleep(1.0)  # both followers assigned
        totals, to_publish, to_serve, kinds = [], [], [], []
        to_batch: list[float] = []
        # serving's own load time (verify, load, apply or rebuild, checks) per version
        loads: dict[str, list[float]] = {"full": [], "delta": []}
        timeouts = 0
        for k in range(args.clicks):
            user = f"fresh-{uuid.uuid4().hex[:6]}"
            event = {
                "event_id": uuid.uuid4().hex,
                "ts": time.time(),
                "user_id": user,
                "item_id": "50",
                "label": 1,
                "context": {"device": "bench"},
            }
            body = json.dumps({"user_id": user, "candidates": ["50"]}).encode()
            t_click = time.time()
            meta = producer.send(
                clicks_topic, key=user.encode(), value=json.dumps(event).encode()
            ).get(10)
            deadline = t_click + args.timeout
            while True:
                code, doc = http_json(f"{base}/v1/score", body)
                now = time.time()
                v = doc.get("model_version") if code == 200 else None
                if v is not None and v != "baseline" and v not in manifests:
                    if v in announced:  # the announcement carries the manifest
                        manifests[v] = announced[v]
                    else:
                        try:
                            manifests[v] = store.manifest(v)
                        except CheckpointError:
                            pass  # pruned and not read yet: the next response decides
                m = manifests.get(v) if v is not None else None
                if m is not None:
                    if trained_past(m, [clicks_topic, "clicks"], meta.partition, meta.offset):
                        totals.append(now - t_click)
                        to_publish.append(m["created_at"] - t_click)
                        to_serve.append(now - m["created_at"])
                        kinds.append(m.get("kind", "full"))
                        state = (http_json(f"{base}/v1/models/{v}")[1].get("state") or {})
                        if state.get("load_seconds") is not None:  # read now: evicted later
                            loads[kinds[-1]].append(float(state["load_seconds"]))
                        if event["event_id"] in batched:
                            to_batch.append(batched[event["event_id"]] - t_click)
                        print(
                            f"click {k + 1}: partition {meta.partition} offset {meta.offset} -> served by "
                            f"{kinds[-1]} version {v} after {totals[-1]:.2f}s (published at "
                            f"+{to_publish[-1]:.2f}s, served {to_serve[-1] * 1000:.0f} ms later)",
                            flush=True,
                        )
                        break
                if now > deadline:
                    timeouts += 1
                    print(f"click {k + 1}: not reflected in a served model after "
                          f"{args.timeout}s (counted as timed out)", flush=True)
                    break
                time.sleep(args.poll)
            time.sleep(args.gap)
        producer.close()
        stop_watch.set()
        watch.join(10)
        batches.join(10)
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            text = r.read().decode()
        applied = {how: int(float(m.group(1))) for how in ("patched", "rebuilt") if (m := re.search(
            rf'^headwater_model_deltas_applied_total{{how="{how}"}} ([0-9.e+-]+)$', text, re.M))}
        cost = {}
        for n, (s0, c0) in cost0.items():
            s1, c1 = learner_metric(metrics_url, n)
            cost[n] = ((s1 - s0) / (c1 - c0), int(c1 - c0)) if c1 > c0 else (float("nan"), 0)
        sizes: dict[str, list[int]] = {"full": [], "delta": []}
        for m in list(announced.values()):  # every publication, pruned ones too
            sizes[m.get("kind", "full")].append(int(m["bytes"]))
        return {"timeouts": timeouts, "totals": totals, "to_publish": to_publish, "to_serve": to_serve, "kinds": kinds,
                "to_batch": to_batch, "loads": loads, "applied": applied,
                "cost": cost, "sizes": sizes,
                "publish_every": settings.publish_every_seconds,
                "delta_every": settings.delta_every_seconds}
    finally:
        if replay is not None:
            replay.terminate()
            replay.wait(30)
        if tmp is not None:
            try:
                cli(env, "down", timeout=120)
            except Exception as exc:  # noqa: BLE001 - report, the stack may already be gone
                print(f"headwater down failed: {exc}; kept {tmp}", file=sys.stderr)
            else:
                if args.keep:
                    print(f"kept {tmp}")
                else:  # the stack's state dir, logs and model store were this run's only
                    shutil.rmtree(tmp, ignore_errors=True)


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clicks", type=int, default=10, help="timed clicks per mode and round")
    ap.add_argument("--rate", type=float, default=200.0,
                    help="background replay, events/s (0: a warm-up replay only)")
    ap.add_argument("--warmup", type=int, default=3000, help="--rate 0: MovieLens clicks first")
    ap.add_argument("--deltas", default="off,on", help="modes, in order: off, on (comma list)")
    ap.add_argument("--delta-every", type=float, default=1.0, help="mode on: delta period (s)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the modes this many times")
    ap.add_argument("--wait-items", type=float, default=0.0,
                    help="replay: seconds to wait for item codes first (0: don't)")
    ap.add_argument("--poll", type=float, default=0.02)
    ap.add_argument("--gap", type=float, default=0.5, help="pause between timed clicks (s)")
    ap.add_argument("--settle", type=float, default=5.0, help="wait after ready (s)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per click")
    ap.add_argument("--existing", action="store_true", help="use the running stack (HEADWATER_*)")
    ap.add_argument("--keep", action="store_true",
                    help="keep each own stack's temporary directory (state, logs, model store); "
                         "by default it is deleted once the stack is down")
    args = ap.parse_args()

    modes = [m.strip() for m in args.deltas.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        ap.error(f"--deltas: modes are {sorted(MODES)}")
    # a SIGTERM unwinds like Ctrl-C, so each stack still goes down and its directory away
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs: dict[str, list[dict]] = {}
    plan = ["existing"] if args.existing else modes * args.rounds
    for mode in plan:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if mode != "existing":
            env["HEADWATER_DELTA_EVERY_SECONDS"] = MODES[mode] or str(args.delta_every)
        print(f"\n== deltas {mode}: load average {loadavg()} ==", flush=True)
        runs.setdefault(mode, []).append(measure(args, env, own_stack=not args.existing))
        print(f"== deltas {mode} done: load average {loadavg()} ==", flush=True)

    print(f"\n{args.clicks} clicks per mode and round, {args.rounds} round(s), background replay "
          f"{args.rate:g} events/s, poll every {args.poll * 1000:.0f} ms; load average now {loadavg()}")
    print("\n| deltas | clicks | timed out | click → served p50 s | p99 s | max s | "
          "→ on train-batches p50 s | → published p50 s | published → served p50 s | "
          "served by a delta |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    p50 = {}
    for mode, rs in runs.items():
        tot = [x for r in rs for x in r["totals"]]
        pub = [x for r in rs for x in r["to_publish"]]
        srv = [x for r in rs for x in r["to_serve"]]
        kinds = [x for r in rs for x in r["kinds"]]
        bat = [x for r in rs for x in r["to_batch"]]
        if not tot:
            print(f"| {mode} | 0 | {sum(r['timeouts'] for r in rs)} | – | – | – | – | – | – | – |")
            continue
        p50[mode] = percentile(tot, 50)
        print(f"| {mode} | {len(tot)} | {sum(r['timeouts'] for r in rs)} | {p50[mode]:.2f} | {percentile(tot, 99):.2f} | "
              f"{max(tot):.2f} | {percentile(bat, 50) if bat else float('nan'):.2f} | "
              f"{percentile(pub, 50):.2f} | {percentile(srv, 50):.2f} | "
              f"{kinds.count('delta')} of {len(kinds)} |")
    if "off" in p50 and "on" in p50:
        print(f"\np50 on / off: {p50['on'] / p50['off']:.2f}x")
    print("\n| deltas | full: learner s per publication (n) | delta: learner s (n) | "
          "full MB (median) | delta MB (median) |")
    print("|---|---:|---:|---:|---:|")
    for mode, rs in runs.items():
        r = rs[-1]
        (fs, fn), (ds, dn) = (r["cost"]["headwater_learner_publish_seconds"],
                              r["cost"]["headwater_learner_delta_seconds"])
        med = {k: (sorted(v)[len(v) // 2] / 1e6 if v else float("nan"))
               for k, v in r["sizes"].items()}
        print(f"| {mode} | {fs:.3f} ({fn}) | {ds:.3f} ({dn}) | {med['full']:.2f} | "
              f"{med['delta']:.2f} |")
    print("\nServing's load of the versions that answered the timed clicks (verify, load, "
          "apply or rebuild, checks; GET /v1/models/{v} load_seconds):")
    print("\n| deltas | full: load p50 s (n) | delta: load p50 s (n) | deltas patched / rebuilt |")
    print("|---|---:|---:|---:|")
    for mode, rs in runs.items():
        cells = []
        for kind in ("full", "delta"):
            xs = [x for r in rs for x in r["loads"][kind]]
            cells.append(f"{percentile(xs, 50):.3f} ({len(xs)})" if xs else "– (0)")
        ap = [sum(r["applied"].get(h, 0) for r in rs) for h in ("patched", "rebuilt")]
        print(f"| {mode} | {cells[0]} | {cells[1]} | {ap[0]} / {ap[1]} |")
    r = next(iter(runs.values()))[-1]
    print(f"\nlearner publish_every_seconds={r['publish_every']}, delta period (on) "
          f"{args.delta_every}s")


if __name__ == "__main__":
    main()
