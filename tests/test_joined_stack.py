"""The joined path end to end on the embedded stack: score → impression → click →
joined row → trained → served.

`headwater replay movielens --as impressions` sends real MovieLens ratings through
`POST /v1/score` (serving logs each answer to `impressions`) and a click for every
rating ≥ 4 (quoting the answer's request id); the worker joins them into labelled rows
with the served features; the learner trains them and publishes; serving swaps the
model in and answers with it.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from learner.batch import decode_batch
from tests.stackutil import embedded_stack_env, hw, read_topic, wait_until

pytestmark = pytest.mark.integration

N = 600


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_scored_impressions_and_clicks_train_the_model_serving_answers_with(tmp_path):
    env = embedded_stack_env(tmp_path, HEADWATER_JOIN=1, HEADWATER_JOIN_WINDOW_SECONDS=20,
                             HEADWATER_JOIN_LATENESS_SECONDS=1, HEADWATER_JOIN_IDLE_SECONDS=2,
                             HEADWATER_PUBLISH_EVERY_SECONDS=2, HEADWATER_LEARNER_STEP_WAIT_SECONDS=0.5)
    base = f"http://127.0.0.1:{env['HEADWATER_HTTP_PORT']}"
    hw(env, "up")
    try:
        status = json.loads(hw(env, "status", "--json", check=False).stdout)
        kafka = status["kafka"]["address"]
        done = hw(env, "replay", "movielens", "--as", "impressions", "--limit", str(N),
                  "--no-progress", "--wait-items", "60", check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout
        assert f"{N} impressions (serving)" in out, out
        clicks = int(out.split(" with ")[1].split()[0])

        def joined():
            rows: dict[str, int] = {}
            for rec in read_topic(kafka, "train-batches", timeout=2):
                b = decode_batch(rec.value)
                if b.source_topic == "joined:impressions":
                    rows.update(zip(map(str, b.event_ids), b.labels.tolist(), strict=True))
            return rows
        rows = wait_until(lambda: (r := joined()) and len(r) >= N and r, 120, interval=2,
                          what="a joined row per impression")
        # clicks come 1-5 s after the answer (the window is 20 s): every one labels its row
        assert len(rows) == N and sum(rows.values()) == clicks

        def trained_on_joined():
            models = get(f"{base}/v1/models")
            version = models.get("serving")
            if not version:
                return None
            manifest = get(f"{base}/v1/models/{version}")["manifest"] or {}
            marks = manifest.get("watermarks") or {}
            # a watermark is the next row to handle: (last row's sequence number, sub + 1)
            seen = sum(v["offset"] + (v["sub"] > 0) for k, v in marks.items()
                       if k.startswith("joined:impressions:"))
            return (version, seen) if seen >= N else None
        version, _ = wait_until(trained_on_joined, 120, interval=1,
                                what="a served model trained on every joined row")
        req = urllib.request.Request(f"{base}/v1/score", data=json.dumps(
            {"user_id": "196", "candidates": ["242", "302"]}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.loads(resp.read())
        assert answer["model_version"] == version and len(answer["request_id"]) == 32
    finally:
        hw(env, "down", check=False)
