"""The model store on S3-compatible object storage, end to end on the real broker and Redis.

Worker, learner and serving run as separate processes that share no model directory:
the learner publishes to a bucket over HTTP (moto's server, an S3 emulator:
docs/decisions.md) and serving loads, verifies and hot-swaps from it.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from core.settings import Settings
from headwater.client import EventSender
from learner.model_stores import open_model_store
from tests.conftest import S3_SECRET
from tests.stackutil import Service, service_env, wait_until

pytestmark = pytest.mark.integration


def _get(port: int, path: str, body: dict | None = None) -> dict | None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method="POST" if body is not None else "GET",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def _clicks(n: int, start: int, tag: str) -> list[dict]:
    now = time.time()
    return [{"event_id": f"{tag}-{i}", "ts": now - 60 + i * 0.01, "user_id": f"u{i % 40}",
             "item_id": f"i{i % 25}", "label": int(i % 25 < 8)} for i in range(start, start + n)]


def test_learner_publishes_to_the_bucket_and_serving_hot_swaps_from_it(
        s3_settings, kafka_bootstrap, redis_db, topic_prefix, tmp_path):
    s3_env = {
        "HEADWATER_MODEL_STORE": s3_settings["model_store"],
        "HEADWATER_MODEL_STORE_ENDPOINT": s3_settings["model_store_endpoint"],
        "HEADWATER_MODEL_STORE_ACCESS_KEY": s3_settings["model_store_access_key"],
        "HEADWATER_MODEL_STORE_SECRET_KEY": S3_SECRET,
    }
    common = dict(HEADWATER_CONTENT_ENCODER="hashing", HEADWATER_PUBLISH_EVERY_SECONDS="1",
                  HEADWATER_LEARNER_STEP_WAIT_SECONDS="0.2", HEADWATER_MODEL_KIND="deepfm",
                  HEADWATER_EMBEDDING_BUCKETS="512", HEADWATER_EMBEDDING_DIM="4", **s3_env)
    # Each service gets its own state directory: nothing on disk is shared.
    envs = {name: service_env(kafka_bootstrap, redis_db, topic_prefix, tmp_path / name, **common)
            for name in ("worker", "learner", "serve")}
    port = int(envs["serve"]["HEADWATER_HTTP_PORT"])
    from streams.topics import ensure_topics

    ensure_topics(Settings(topic_prefix=topic_prefix), kafka_bootstrap)
    store = open_model_store(Settings(**s3_settings))
    services = [Service(name, env, tmp_path / "logs") for name, env in envs.items()]
    logs = lambda: "\n".join(s.log()[-4000:] for s in services)  # noqa: E731
    try:
        with EventSender(kafka_bootstrap, topic_prefix=topic_prefix) as sender:
            sender.send_clicks(_clicks(600, 0, "a"))

        def trained() -> str | None:
            doc = _get(port, "/v1/score", {"user_id": "u1", "candidates": ["i1", "i2"]})
            return doc and doc["model_version"] != "baseline" and doc["model_version"]

        first = wait_until(trained, 120, interval=0.3, what="a model from the bucket serving",
                           on_fail=logs)
        assert first in store.versions(), (first, store.versions())

        with EventSender(kafka_bootstrap, topic_prefix=topic_prefix) as sender:
            sender.send_clicks(_clicks(300, 600, "b"))

        def swapped() -> dict | None:
            doc = _get(port, "/v1/models")
            return doc and doc["serving"] and int(doc["serving"]) > int(first) and doc

        doc = wait_until(swapped, 90, interval=0.3, what="a hot swap to a newer version",
                         on_fail=logs)
        newer = doc["serving"]
        manifest = store.verify(newer)  # in the bucket, whole: size and sha256 match
        assert manifest["rows_trained"] > 0 and int(manifest["parent"]) >= int(first)
        assert [m for m in doc["models"] if m["version"] == newer][0]["state"] == "AVAILABLE"
        for name in envs:  # no model directory on any service's disk
            assert not (tmp_path / name / "models").exists()
        status = json.dumps(_get(port, "/v1/status"))
        assert S3_SECRET not in status and S3_SECRET not in logs()
    finally:
        for svc in services:
            svc.stop()
