"""What `/v1/score` serves is as good as the learner believes, and better than popularity.

On the embedded stack (`headwater up`): MovieLens-100K items, then its first rated rows
as live click events (stamped at send time, per-user bursts as the users rated); once
the learner has trained them, each following row is scored through `POST /v1/score`
*before* its click is sent as a single-event message, as a live client and producer
would. Asserted on those rows:

* the served AUC is within 0.02 of the learner's served-lag AUC (the same rows'
  training rows, scored by the versions that answered the requests). Each request waits
  until the worker has counted the user's previous events: on a loaded machine the
  worker may lag by seconds, and this test is about the model serving runs (the
  benchmark, `bench/served_movielens.py`, measures the live lag too);
* the served AUC beats the item smoothed CTR that serving reads for the same rows.

The companion test: with the worker caught up, the row serving builds for an event and
the row the worker wrote to `train-batches` for it are identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.served_movielens import (
    get_json,
    learner_served_lag,
    post_json,
    score_then_send,
    wait_trained,
)
from features.movielens import click_events, load_movielens
from learner.metrics import exact_auc
from tests.stackutil import embedded_stack_env, hw, wait_until

pytestmark = pytest.mark.integration

TRAIN_ROWS = 12_000
TEST_ROWS = 1_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    # every version that answered a request stays loadable for the learner-side scores:
    # full checkpoints only, since retention deletes the deltas of a superseded full
    # checkpoint whatever HEADWATER_KEEP_VERSIONS says (docs/decisions.md); deltas serving
    # exactly like full checkpoints is tests/serving/test_delta_serving.py's
    env = embedded_stack_env(tmp, HEADWATER_KEEP_VERSIONS=100000, HEADWATER_DELTA_EVERY_SECONDS=0)
    hw(env, "up")
    try:
        status = json.loads(hw(env, "status", "--json", check=False).stdout)
        yield {
            "env": env,
            "base": f"http://127.0.0.1:{env['HEADWATER_HTTP_PORT']}",
            "kafka": status["kafka"]["address"],
            "redis": status["redis"]["address"],
            "models": env["HEADWATER_MODEL_STORE"],
        }
    finally:
        hw(env, "down", check=False)


@pytest.fixture(scope="module")
def movielens(data_dir):
    return load_movielens(data_dir / "ml-100k")


@pytest.fixture(scope="module")
def trained(stack, movielens):
    hw(stack["env"], "replay", "movielens", "--live", "--no-progress", "--limit",
       str(TRAIN_ROWS), "--rate", "2000", "--batch", "50", timeout=600)
    wait_trained(stack["base"], TRAIN_ROWS, timeout=600)
    stack["sent"] = TRAIN_ROWS  # click events sent so far (the tests send more)
    return stack


def _store(stack):
    from features.store import SyncOnlineStore

    return SyncOnlineStore.from_url(stack["redis"], partitions=4)


def _producer(stack):
    from streams.producer import make_producer

    return make_producer(stack["kafka"])


def test_served_auc_matches_the_learner_and_beats_popularity(trained, movielens):
    stack = trained
    events = click_events(movielens, TRAIN_ROWS, TRAIN_ROWS + TEST_ROWS)
    producer, store = _producer(stack), _store(stack)
    try:
        rows = score_then_send(stack["base"], producer, "clicks", 4, events, store,
                               wait_user_counted=60)
        stack["sent"] += len(events)
    finally:
        producer.close()
        store.close()
    wait_trained(stack["base"], stack["sent"], timeout=600)
    lag, found = learner_served_lag(rows, stack["kafka"], "train-batches", stack["models"],
                                    "ranker")
    assert found == TEST_ROWS, "every test event has its training row"
    assert not np.isnan(lag).any(), "every answering version is in the model store"
    y = np.asarray(rows.labels)
    served = rows.auc(rows.served)
    learner = exact_auc(y, lag)
    popularity = rows.auc(rows.item_ctr)
    print(f"served {served:.4f}  learner served-lag {learner:.4f}  item CTR {popularity:.4f}")
    assert abs(served - learner) <= 0.02, (served, learner)
    assert served > popularity, (served, popularity)


def test_serving_row_equals_training_row_once_the_worker_caught_up(trained, movielens):
    """Score a (user, item) pair, wait until the worker has counted everything sent, then
    compare serving's row for the next event with the row the worker writes for it."""
    from kafka import KafkaConsumer, TopicPartition

    from core.settings import Settings
    from features.defaults import row_builder
    from learner.batch import decode_batch
    from streams.topics import partition_of

    stack = trained
    start = stack["sent"]  # the next MovieLens row not sent yet
    ev = click_events(movielens, start, start + 1)[0]
    store = _store(stack)
    try:
        # the worker has written the rows of every event sent so far (after applying them
        # to the counters), so serving reads the counters the next row will see
        def counted():
            workers = get_json(f"{stack['base']}/v1/status")["services"].get("worker", [])
            return workers and workers[0]["rows_out_total"] >= start

        wait_until(counted, 120, what="the worker to count every event sent")
        now = float(np.floor(1e3 * __import__("time").time()) / 1e3)
        builder = row_builder(Settings())
        feats = store.get_online_features(
            {"user_id": [ev["user_id"]], "item_id": [ev["item_id"]]}, now=now)
        serving_cols = builder.build_for_scoring(ev["user_id"], ev["user"], None,
                                                 [ev["item_id"]], feats, now=now)
    finally:
        store.close()
    producer = _producer(stack)
    part = int(partition_of([ev["user_id"]], 4)[0])
    try:
        producer.send("clicks", value=json.dumps(dict(ev, ts=now)).encode(), partition=part)
        producer.flush()
        stack["sent"] += 1
    finally:
        producer.close()

    consumer = KafkaConsumer(bootstrap_servers=stack["kafka"], enable_auto_commit=False,
                             fetch_max_wait_ms=50)
    tp = TopicPartition("train-batches", part)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    row = None
    try:
        def find():
            nonlocal row
            for msgs in consumer.poll(timeout_ms=500).values():
                for m in msgs:
                    b = decode_batch(m.value)
                    hit = np.flatnonzero(b.event_ids.astype(str) == str(ev["event_id"]))
                    if hit.size:
                        row = (b, int(hit[0]))
            return row

        wait_until(find, 60, interval=0.0, what="the event's training row")
    finally:
        consumer.close()
    batch, j = row
    for f_idx, name in enumerate(batch.categorical_fields):
        assert batch.categorical[j, f_idx] == serving_cols[f"c:{name}"][0], name
    for d_idx, name in enumerate(batch.dense_names):
        np.testing.assert_allclose(batch.dense[j, d_idx], serving_cols[f"d:{name}"][0],
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    # and serving itself answers for the pair (the row above is what it scores)
    assert post_json(f"{stack['base']}/v1/score",
                     {"user_id": ev["user_id"], "candidates": [ev["item_id"]]})["scores"]
