"""Benchmark: time from producing a click to the first response scored by a model trained on it.

Runs against the real stack: by default it starts its own with ``headwater up`` (throwaway
state dir and model store, free ports) and stops it with ``headwater down``;
``--existing`` uses the stack the current ``HEADWATER_*`` settings point at instead.
It replays ``--warmup`` MovieLens clicks (``headwater replay movielens``) so the learner
publishes a first model and serving becomes ready, then, ``--clicks`` times: produce one
click to the clicks topic (noting its partition and offset), and poll ``POST /v1/score``
every ``--poll`` seconds. A response counts when its ``model_version``'s manifest has a
watermark past that offset for that partition (the learner saves "next row to train"
per source partition in every publication). Reported: medians and max of
click → first such response, plus its parts (→ version published, published → served).

    .venv/bin/python bench/serving_freshness.py [--clicks 5] [--warmup 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import Settings  # noqa: E402
from headwater.servers import free_port  # noqa: E402
from learner.model_stores import open_model_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3000, help="MovieLens clicks replayed first")
    ap.add_argument("--poll", type=float, default=0.02)
    ap.add_argument("--timeout", type=float, default=120.0, help="per click")
    ap.add_argument("--existing", action="store_true", help="use the running stack (HEADWATER_*)")
    args = ap.parse_args()

    env = dict(os.environ, PYTHONPATH=str(REPO))
    tmp = None
    if not args.existing:
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
        store = open_model_store(settings)  # a directory or a bucket
        clicks_topic = settings.topics["clicks"]

        t0 = time.time()
        print(
            cli(env, "replay", "movielens", "--limit", str(args.warmup), "--no-progress"),
            flush=True,
        )
        while http_json(f"{base}/readyz")[0] != 200:
            if time.time() - t0 > 600:
                raise RuntimeError("serving never became ready (no model published?)")
            time.sleep(0.5)
        print(f"serving ready {time.time() - t0:.1f}s after the warm-up replay began", flush=True)

        from kafka import KafkaProducer

        producer = KafkaProducer(
            bootstrap_servers=kafka, acks=1, enable_idempotence=False, linger_ms=0
        )
        manifests: dict[str, dict] = {}
        totals, to_publish, to_serve = [], [], []
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
                if v is not None:
                    if v not in manifests:
                        manifests[v] = store.manifest(v)
                    m = manifests[v]
                    if trained_past(m, [clicks_topic, "clicks"], meta.partition, meta.offset):
                        totals.append(now - t_click)
                        to_publish.append(m["created_at"] - t_click)
                        to_serve.append(now - m["created_at"])
                        print(
                            f"click {k + 1}: partition {meta.partition} offset {meta.offset} -> served by "
                            f"version {v} after {totals[-1]:.2f}s (published at +{to_publish[-1]:.2f}s, "
                            f"served {to_serve[-1] * 1000:.0f} ms later)",
                            flush=True,
                        )
                        break
                if now > deadline:
                    raise RuntimeError(
                        f"click {k + 1} not reflected in a served model after {args.timeout}s"
                    )
                time.sleep(args.poll)
        producer.close()
        print()
        print("| stage | median s | max s |")
        print("|---|---:|---:|")
        for name, xs in (
            ("click → first response by a model trained on it", totals),
            ("click → that version published (manifest created_at)", to_publish),
            ("published → first response served by it", to_serve),
        ):
            print(f"| {name} | {statistics.median(xs):.2f} | {max(xs):.2f} |")
        print(
            f"\nlearner publish_every_seconds={settings.publish_every_seconds}, "
            f"{args.clicks} clicks, poll every {args.poll * 1000:.0f} ms"
        )
    finally:
        if tmp is not None:
            try:
                cli(env, "down", timeout=120)
            except Exception as exc:  # noqa: BLE001 - report, the stack may already be gone
                print(f"headwater down failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
