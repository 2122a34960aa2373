"""Delta publications (on by default) through restarts, on the real stack: broker, Redis,
worker, learner and serving processes, MovieLens clicks all along.

The learner is killed with -9 while it publishes deltas and starts again, then serving
is stopped and started again. A delta must only ever be applied on the full checkpoint
it was computed from: every delta in the store names its base by version and sha256,
and that base is the store's checkpoint of that number; the restarted learner's deltas
are on the full checkpoint it resumed from (or a later one of its own), never on one it
did not hold; serving refuses nothing (no version FAILED), patches the deltas onto their
loaded base, and after its own restart serves a delta again, its base loaded from the
store.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from learner.store import CheckpointError, LocalModelStore
from tests.faults.test_worker_faults import PARTITIONS, produce
from tests.stackutil import Service, service_env, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

CHUNK, PAUSE = 200, 0.4  # clicks produced all along: 500 events/s


def _get(port: str, path: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def _deltas_applied(port: str, how: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    key = f'headwater_model_deltas_applied_total{{how="{how}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(key)), 0.0)


class _Feeder(threading.Thread):
    """Clicks in chunks of ``CHUNK`` every ``PAUSE`` seconds until stopped."""

    def __init__(self, kafka: str, topic: str, events: list[dict]) -> None:
        super().__init__(daemon=True)
        self.kafka, self.topic, self.events = kafka, topic, events
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stop.is_set() and self.sent < len(self.events):
            produce(self.kafka, self.topic, self.events[self.sent:self.sent + CHUNK])
            self.sent += CHUNK
            self.stop.wait(PAUSE)


def _delta_bases(store: LocalModelStore) -> dict[int, tuple[int, str]]:
    """``{delta version: (base version, base_sha256)}`` of the deltas in the store, each
    checked against the store's base (``check_base`` raises on another checkpoint)."""
    out = {}
    for v in store.versions():
        try:
            manifest = store.manifest(v)
            if manifest.get("kind") != "delta":
                continue
            base = store.check_base(manifest)
        except CheckpointError as exc:
            if "not in the store" in str(exc) or not store.exists(v):
                continue  # pruned meanwhile (retention): nothing to check any more
            raise
        out[int(v)] = (int(base), manifest["base_sha256"])
    return out


def test_deltas_apply_only_on_their_own_base_through_learner_and_serving_restarts(
        kafka_bootstrap, redis_db, tmp_path, topic_prefix, data_dir):
    from core.settings import Settings
    from features.movielens import click_events, load_movielens
    from streams.topics import ensure_topics

    env = service_env(kafka_bootstrap, redis_db, topic_prefix, tmp_path,
                      HEADWATER_CONTENT_ENCODER="hashing", HEADWATER_CLICK_BATCH_SIZE=500,
                      HEADWATER_PUBLISH_EVERY_SECONDS=4, HEADWATER_EMBEDDING_BUCKETS=256,
                      HEADWATER_EMBEDDING_DIM=4, HEADWATER_SERVE_WORKERS=1)
    env.pop("HEADWATER_DELTA_EVERY_SECONDS", None)  # the product's default: deltas on
    assert Settings().delta_every_seconds > 0
    ensure_topics(Settings(topic_prefix=topic_prefix, partitions=PARTITIONS), kafka_bootstrap)
    events = click_events(load_movielens(data_dir / "ml-100k"), 0, 60_000)
    store = LocalModelStore(tmp_path / "models", "ranker")
    port = env["HEADWATER_HTTP_PORT"]
    logs = tmp_path / "logs"
    services = {name: Service(name, env, logs) for name in ("worker", "learner", "serve")}
    feeder = _Feeder(kafka_bootstrap, f"{topic_prefix}clicks", events)

    def stack_logs() -> str:
        return "\n".join(f"== {n}\n{s.log()[-2500:]}" for n, s in services.items())

    def serving_a_delta(after: int):
        """The delta version serving answers with, once it is newer than ``after``."""
        listing = _get(port, "/v1/models") or {}
        v = listing.get("serving")
        if v and int(v) > after and store.exists(v) and store.kind(v)[0] == "delta":
            return v
        return None

    try:
        feeder.start()
        first = wait_until(lambda: serving_a_delta(0), 180, interval=0.2,
                           what="serving a delta", on_fail=stack_logs)

        # the learner dies mid-stream (deltas on the newest full checkpoint in the store)
        services["learner"].kill9()
        at_kill = int(store.latest())
        resumed_from = int(store.latest_good())
        services["learner"] = Service("learner", env, logs)
        after_learner = wait_until(lambda: serving_a_delta(at_kill), 180, interval=0.2,
                                   what="serving a delta of the restarted learner",
                                   on_fail=stack_logs)
        # its deltas are on the checkpoint it resumed from, or on a later full of its own
        fulls_after = {int(v) for v in store.versions()
                       if int(v) > at_kill and store.kind(v)[0] == "full"}
        restarted = {d: b for d, (b, _) in _delta_bases(store).items() if d > at_kill}
        assert restarted, "the restarted learner published deltas"
        assert all(b == resumed_from or b in fulls_after for b in restarted.values()), (
            restarted, resumed_from, fulls_after)

        # serving restarts: it loads the newest version, a delta's base first
        services["serve"].stop()
        at_serve = int(store.latest())
        services["serve"] = Service("serve", env, logs)
        after_serve = wait_until(lambda: serving_a_delta(at_serve), 180, interval=0.2,
                                 what="the restarted serving answering with a new delta",
                                 on_fail=stack_logs)
        doc = _get(port, f"/v1/models/{after_serve}")
        assert doc["kind"] == "delta" and doc["state"]["state"] == "AVAILABLE"
        assert doc["manifest"]["base_sha256"] == store.manifest(doc["base"])["sha256"]
        assert _deltas_applied(port, "patched") >= 1  # onto its loaded base, no rebuild
        feeder.stop.set()
        feeder.join()

        # nothing refused anywhere, and every delta in the store is on its own base
        listing = _get(port, "/v1/models")
        failed = [m for m in listing["models"] if m["state"] == "FAILED"]
        assert not failed, failed
        for name in ("learner", "serve"):
            assert "another base" not in services[name].log()
            assert "not the checkpoint the delta was computed against" not in services[name].log()
        assert _delta_bases(store)
        assert int(first) < int(after_learner) < int(after_serve)
        assert all(s.alive() for s in services.values()), stack_logs()
    finally:
        feeder.stop.set()
        for svc in services.values():
            svc.stop()
