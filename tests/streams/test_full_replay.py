"""The whole of MovieLens-100K replayed through a real worker: every item's all-time totals,
read the way `headwater features get item:ID` reads them, equal a direct count over the file."""

from __future__ import annotations

import collections

import pytest

from core.settings import Settings
from features.movielens import load_movielens
from features.store import SyncOnlineStore
from headwater.servers import start_redis
from streams.replay import replay_movielens
from tests.stackutil import Service, service_env, wait_until

pytestmark = pytest.mark.integration


def test_full_replay_item_totals_equal_a_direct_count(kafka_bootstrap, data_dir, tmp_path,
                                                      topic_prefix):
    ml = load_movielens(data_dir / "ml-100k")
    expected: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for item, label in zip(ml.clicks["item_id"], ml.clicks["label"], strict=True):
        expected[item][0] += 1
        expected[item][1] += int(label)
    redis_server = start_redis(log_path=tmp_path / "redis.log")  # its own: nothing else flushes it
    url = redis_server.extra["url"]
    env = service_env(kafka_bootstrap, url, topic_prefix, tmp_path, HEADWATER_CONTENT_ENCODER="hashing")
    worker = Service("worker", env, tmp_path / "logs")
    store = SyncOnlineStore.from_url(url, partitions=4)
    try:
        stats = replay_movielens(Settings(topic_prefix=topic_prefix), kafka_bootstrap,
                                 data_dir / "ml-100k", progress=False, redis_url=url, wait_items=60)
        assert stats["clicks"] == len(ml) == 72_855

        def all_counted():
            return sum(store.entity_features(f"item:{i}")["impressions_total"]
                       for i in expected) == len(ml)

        wait_until(all_counted, 180, interval=1.0, what="the replay to be counted", on_fail=worker.log)
        wrong = {}
        for item in ml.items:
            doc = store.entity_features(f"item:{item}")
            got = (int(doc["impressions_total"]), int(doc["clicks_total"]))
            want = tuple(expected[item]) if item in expected else (0, 0)
            if got != want:
                wrong[item] = (got, want)
        assert not wrong, f"{len(wrong)} items differ (got, want), e.g. {list(wrong.items())[:5]}"
    finally:
        store.close()
        worker.stop()
        redis_server.stop()
