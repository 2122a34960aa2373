"""Served AUC: what a client of ``POST /v1/score`` gets, measured as a client sees it.

Against the real stack (by default its own ``headwater up`` with throwaway state):

1. items, then the first 80 % of MovieLens-100K's rated rows as live click events
   (``headwater replay movielens --live``: stamped with the time they are sent);
2. wait until the learner has trained every one of them;
3. every remaining row, one at a time: score it through ``POST /v1/score`` *before* its
   click event is sent (single-event message, stamped at send time), and read the item's
   smoothed CTR as served (``get_online_features``) for the popularity baseline.

Reported on the same rows: the served AUC; the item-CTR baseline; the learner's
*served-lag* AUC on the same rows (each row's training row, as the worker wrote it to
``train-batches``, scored by the version that answered its request: what the learner
believes serving gets); and the learner's own status figures.

    .venv/bin/python bench/served_movielens.py [--test-limit N] [--train-rate R]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learner.metrics import exact_auc  # noqa: E402


def post_json(url: str, doc: Any, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def learner_status(base: str) -> dict:
    """The newest learner heartbeat from ``GET /v1/status`` ({} when none yet)."""
    learners = get_json(f"{base}/v1/status").get("services", {}).get("learner", [])
    return max(learners, key=lambda d: d.get("updated_at") or 0, default={})


def wait_trained(base: str, rows: int, timeout: float, what: str = "the learner") -> dict:
    """Wait until the learner's heartbeat says it trained (or dropped as duplicate) ``rows``."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = learner_status(base)
        except OSError as exc:  # a slow answer on a loaded machine: ask again
            print(f"GET /v1/status: {exc}; retrying", file=sys.stderr)
            time.sleep(1)
            continue
        done = (last.get("rows_trained") or 0) + sum(
            v for k, v in (last.get("rows_dropped") or {}).items() if k == "downsampled")
        if done >= rows:
            return last
        time.sleep(0.5)
    raise TimeoutError(f"{what} trained {last.get('rows_trained')} of {rows} rows in {timeout}s")


@dataclass
class ServedRows:
    """What the scoring loop saw, one entry per test event, in send order."""

    event_ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    served: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    item_ctr: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def auc(self, scores: Iterable[float]) -> float:
        return exact_auc(np.asarray(self.labels), np.asarray(list(scores), dtype=float))


def score_then_send(base: str, producer: Any, topic: str, partitions: int,
                    events: list[dict], store: Any,
                    on_each: Callable[[int], None] | None = None,
                    wait_user_counted: float = 0.0) -> ServedRows:
    """Score each event's (user, item) through ``/v1/score``, then send the event itself.

    Events go as single-event messages to the user's partition (the replay's
    partitioning), stamped with the time they are sent. ``wait_user_counted`` (seconds,
    0 = live) first waits until the worker has counted the user's previous events, so
    serving reads the user's counters exactly as the training row will: the comparison
    then measures the model serving runs, not how far the worker lags on a busy machine.
    """
    import msgspec

    from streams.topics import partition_of

    enc = msgspec.json.Encoder()
    parts = partition_of([e["user_id"] for e in events], partitions)
    out = ServedRows()
    counted: dict[Any, int] = {}
    t0 = time.perf_counter()
    for k, (ev, part) in enumerate(zip(events, parts, strict=True)):
        if wait_user_counted:
            uid = ev["user_id"]
            if uid not in counted:
                counted[uid] = int(store.entity_features(f"user:{uid}")["impressions_total"])
            deadline = time.monotonic() + wait_user_counted
            while int(store.entity_features(f"user:{uid}")["impressions_total"]) < counted[uid]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the worker did not count user {uid}'s events "
                                       f"within {wait_user_counted} s")
                time.sleep(0.005)
            counted[uid] += 1
        body = {"user_id": ev["user_id"], "candidates": [ev["item_id"]]}
        if ev.get("user"):
            body["user"] = ev["user"]
        res = post_json(f"{base}/v1/score", body)
        ctr = store.get_online_features({"item_id": [ev["item_id"]]},
                                        features=["item_ctr_total"])["item_ctr_total"][0]
        ev = dict(ev, ts=time.time())
        producer.send(topic, value=enc.encode(ev), partition=int(part))
        out.event_ids.append(str(ev["event_id"]))
        out.labels.append(int(ev["label"]))
        out.served.append(float(res["scores"][0]))
        out.versions.append(str(res["model_version"]))
        out.item_ctr.append(float(ctr))
        if on_each is not None:
            on_each(k)
    producer.flush()
    out.seconds = time.perf_counter() - t0
    return out


def learner_served_lag(rows: ServedRows, bootstrap: str, train_topic: str,
                       store_dir: str | Path, model_name: str) -> tuple[np.ndarray, int]:
    """Each test event's *training* row scored by the version that answered its request.

    Returns the scores (NaN where the row or its version is missing) and how many of the
    events' training rows were found on ``train-batches``.
    """
    from kafka import KafkaConsumer, TopicPartition

    from learner.batch import decode_batch
    from learner.store import LocalModelStore

    wanted = set(rows.event_ids)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             fetch_max_wait_ms=50, max_partition_fetch_bytes=16 << 20)
    try:
        tps = [TopicPartition(train_topic, p)
               for p in sorted(consumer.partitions_for_topic(train_topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        while any(consumer.position(tp) < end[tp] for tp in tps):
            for msgs in consumer.poll(timeout_ms=500).values():
                for m in msgs:
                    b = decode_batch(m.value)
                    for j, eid in enumerate(b.event_ids.tolist()):
                        if str(eid) in wanted:
                            found[str(eid)] = (b.categorical[j:j + 1], b.dense[j:j + 1])
    finally:
        consumer.close()
    store = LocalModelStore(store_dir, model_name, keep=10**9)
    scores = np.full(len(rows.event_ids), np.nan)
    by_version: dict[str, list[int]] = {}
    for k, v in enumerate(rows.versions):
        by_version.setdefault(v, []).append(k)
    import torch

    for version, idx in by_version.items():
        idx = [k for k in idx if rows.event_ids[k] in found]
        if not idx:
            continue
        try:
            model, _ = store.load_model(version)
        except Exception:  # noqa: BLE001 - a pruned version: its rows stay NaN
            continue
        cat = np.concatenate([found[rows.event_ids[k]][0] for k in idx])
        dense = np.concatenate([found[rows.event_ids[k]][1] for k in idx])
        with torch.no_grad():
            scores[idx] = torch.sigmoid(model.logits(cat, dense)).numpy()
    return scores, len(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rate", type=float, default=1000.0,
                    help="events/s of the first 80 %% (live-stamped)")
    ap.add_argument("--test-limit", type=int, default=0, help="score only the first N test rows")
    ap.add_argument("--existing", action="store_true", help="use the running stack (HEADWATER_*)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="extra HEADWATER_* setting for the stack (e.g. MODEL_WIDE=false)")
    args = ap.parse_args()

    from bench.serving_freshness import cli
    from core.settings import Settings, default_data_dir
    from features.movielens import click_events, load_movielens
    from features.store import SyncOnlineStore
    from headwater.servers import free_port

    env = dict(os.environ, PYTHONPATH=str(REPO))
    for kv in args.set:
        k, v = kv.split("=", 1)
        env[f"HEADWATER_{k.upper()}"] = v
    if not args.existing:
        tmp = Path(tempfile.mkdtemp(prefix="hw-served-"))
        env.update(HEADWATER_STATE_DIR=str(tmp / "state"), HEADWATER_MODEL_STORE=str(tmp / "models"),
                   HEADWATER_KAFKA_PORT="0", HEADWATER_REDIS_PORT="0",
                   HEADWATER_HTTP_PORT=str(free_port()), HEADWATER_WORKER_PORT=str(free_port()),
                   HEADWATER_LEARNER_PORT=str(free_port()), HEADWATER_KEEP_VERSIONS="100000")
        env.pop("HEADWATER_KAFKA", None)
        env.pop("HEADWATER_REDIS", None)
        # the learner-side scores re-load every version that answered a request, and retention
        # deletes a superseded checkpoint's deltas whatever KEEP_VERSIONS says: full
        # checkpoints only, unless --set delta_every_seconds=… asks otherwise
        env.setdefault("HEADWATER_DELTA_EVERY_SECONDS", "0")
        print(cli(env, "up", timeout=300), flush=True)
    try:
        status = json.loads(cli(env, "status", "--json", check=False))
        bootstrap, redis_url = status["kafka"]["address"], status["redis"]["address"]
        fields = {k[len("HEADWATER_"):].lower(): v for k, v in env.items()
                  if k.startswith("HEADWATER_") and k[len("HEADWATER_"):].lower() in Settings.model_fields}
        settings = Settings(**fields)
        base = f"http://{settings.bind_host}:{settings.http_port}"
        ml = load_movielens(default_data_dir() / "ml-100k")
        n = len(ml)
        n_train = int(0.8 * n)
        t0 = time.time()
        print(cli(env, "replay", "movielens", "--live", "--no-progress", "--limit", str(n_train),
                  "--rate", str(args.train_rate), "--batch", "50", timeout=3600), flush=True)
        st = wait_trained(base, n_train, timeout=3600)
        print(f"learner trained the first {n_train} rows {time.time() - t0:.0f} s after the replay "
              f"began: prequential AUC {st.get('prequential_auc')}, served-lag AUC "
              f"{st.get('served_auc')}", flush=True)
        events = click_events(ml, n_train, n)
        if args.test_limit:
            events = events[:args.test_limit]
        from streams.producer import make_producer

        producer = make_producer(bootstrap)
        store = SyncOnlineStore.from_url(redis_url, partitions=settings.partitions)
        rows = score_then_send(base, producer, settings.topics["clicks"], settings.partitions,
                               events, store)
        producer.close()
        st = wait_trained(base, n_train + len(events), timeout=3600)
        lag_scores, found = learner_served_lag(rows, bootstrap, settings.topics["train-batches"],
                                               settings.model_store, settings.model_name)
        ok = ~np.isnan(lag_scores)
        y = np.asarray(rows.labels)
        served = np.asarray(rows.served)
        print(f"\nscored {len(events)} test rows one at a time in {rows.seconds:.0f} s "
              f"({len(events) / rows.seconds:.1f} events/s, {len(set(rows.versions))} versions)")
        print("| figure (same rows) | AUC |\n|---|---:|")
        print(f"| served (`POST /v1/score`) | {rows.auc(served):.4f} |")
        print(f"| item smoothed CTR as served (popularity baseline) | {rows.auc(rows.item_ctr):.4f} |")
        print(f"| learner served-lag (training rows, same versions; {ok.sum()} rows) "
              f"| {exact_auc(y[ok], lag_scores[ok]):.4f} |")
        print(f"| served, on those {ok.sum()} rows | {exact_auc(y[ok], served[ok]):.4f} |")
        print(f"\nlearner status after the run: prequential AUC {st.get('prequential_auc')}, "
              f"served-lag AUC {st.get('served_auc')} (cumulative over all {st.get('rows_trained')} rows)")
    finally:
        if not args.existing:
            print(cli(env, "down", timeout=120), flush=True)


if __name__ == "__main__":
    main()
