"""A feature definition that is not MovieLens, end to end on the real stack: a worker
started with HEADWATER_FEATURES counts and builds rows exactly as the file says, and
(HEADWATER_SEQ_LEN) each row carries its user's recent clicks, point in time."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from core.settings import Settings
from features.defaults import code_field_names
from features.hashing import hash_tokens
from headwater.client import EventSender, FeatureReader
from learner.batch import decode_batch
from tests.stackutil import Service, hw, read_topic, service_env, wait_until

pytestmark = pytest.mark.integration

NEWS = """
name: news
version: 3
attributes:
  user: [country]
  item: [publisher]
  context: [device, hour]
counters:
  half_lives: [30m]
  smoothing: {prior: 0.2, alpha: 10}
  families:
    user: [user_id]
    item: [item_id]
    publisher: [item.publisher]
    device_publisher: [context.device, item.publisher]
model:
  bucketized: [publisher]
"""


def test_a_news_definition_runs_end_to_end(kafka_bootstrap, redis_db, tmp_path):
    definition = tmp_path / "news.yaml"
    definition.write_text(NEWS)
    prefix = f"news{int(time.time() * 1000) % 10**8}-"
    env = service_env(kafka_bootstrap, redis_db, prefix, tmp_path, HEADWATER_CONTENT_ENCODER="hashing",
                      HEADWATER_FEATURES=str(definition), HEADWATER_SEQ_LEN="3")
    listing = json.loads(hw(env, "features", "list", "--json").stdout)
    assert listing["name"] == "news" and set(listing["counters"]) == {"user", "item", "publisher", "device_publisher"}
    assert listing["counters"]["device_publisher"] == ["context.device", "item.publisher"]
    worker = Service("worker", env, tmp_path / "logs")
    try:
        now = time.time()
        with EventSender(kafka_bootstrap, topic_prefix=prefix) as sender:
            sender.send_items([{"item_id": "n1", "ts": now - 60, "text": "budget vote",
                                "attributes": {"publisher": "daily"}},
                               {"item_id": "n2", "ts": now - 60, "text": "cup final",
                                "attributes": {"publisher": "sport"}}])
        features = FeatureReader(redis_db, features=str(definition))
        wait_until(lambda: features.get("item:n2").get("attributes", {}).get("publisher") == "sport", 90,
                   what="item attributes stored", on_fail=worker.log)
        clicks = [{"event_id": f"k{i}", "ts": now - 40 + i, "user_id": f"u{i % 2}",
                   "item_id": "n1" if i % 3 else "n2", "label": int(i % 3 == 0),
                   "context": {"device": "phone" if i % 2 else "tv"}, "user": {"country": "NO"}}
                  for i in range(18)]
        with EventSender(kafka_bootstrap, topic_prefix=prefix) as sender:
            sender.send_clicks(clicks)

        def rows():
            batches = [decode_batch(r.value) for r in read_topic(kafka_bootstrap, f"{prefix}train-batches")]
            return batches if sum(len(b.event_ids) for b in batches) >= len(clicks) else None

        batches = wait_until(rows, 90, what="18 training rows", on_fail=worker.log)
        schema = json.loads(batches[0].schema_json)
        assert schema["categorical"] == ["user_id", "item_id", "country", "publisher", "device", "hour",
                                         "publisher_imp_bucket", "publisher_ctr_bucket",
                                         *code_field_names(Settings().code_levels, Settings().vq_k),
                                         "seq0", "seq1", "seq2"]
        assert schema["dense"] == [name for c in ("user", "item", "publisher", "device_publisher")
                                   for w in ("total", "30m")
                                   for name in (f"log1p_{c}_impressions_{w}", f"{c}_ctr_{w}")]
        assert schema["definition"].startswith("news:") and schema["version"] == 3
        cols = {name: [] for name in ("c:publisher", "c:device", "c:country", "d:publisher_ctr_total",
                                     "d:log1p_publisher_impressions_total")}
        ids = []
        for b in batches:
            ids += list(map(str, b.event_ids))
            for name in cols:
                cols[name] += b.table.column(name).to_pylist()
        order = np.argsort([int(i[1:]) for i in ids])
        col = {k: np.asarray(v)[order] for k, v in cols.items()}
        assert (col["c:country"] == hash_tokens("country", ["NO"])[0]).all()
        assert set(col["c:publisher"]) == set(hash_tokens("publisher", ["daily", "sport"]))
        assert set(col["c:device"]) == set(hash_tokens("device", ["phone", "tv"]))
        # publisher counters grow with the stream, point in time: the first row saw nothing
        assert col["d:log1p_publisher_impressions_total"][0] == 0.0
        assert col["d:log1p_publisher_impressions_total"][-1] > 0.0
        # the reader built from the same definition sees the same counter families
        assert features.get("item:n1")["attributes"]["publisher"] == "daily"
        features.close()

        # Recent clicks: a user's events arrive in send order (keyed by user), event times
        # out of order; each row sees the newest 3 clicks sent before it AND older than it.
        rng = np.random.default_rng(3)
        late = [{"event_id": f"s{j}", "ts": now - 30 + float(rng.integers(0, 12)), "user_id": "s1",
                 "item_id": f"x{rng.integers(1, 6)}", "label": int(rng.random() < 0.6)}
                for j in range(16)]
        with EventSender(kafka_bootstrap, topic_prefix=prefix) as sender:
            sender.send_clicks(late)

        def seq_rows():
            got = {}
            for r in read_topic(kafka_bootstrap, f"{prefix}train-batches"):
                b = decode_batch(r.value)
                seq = np.stack([b.table.column(f"c:seq{k}").to_numpy() for k in range(3)], axis=1)
                got.update({str(e): s.tolist() for e, s in zip(b.event_ids, seq, strict=True)
                            if str(e).startswith("s")})
            return got if len(got) == len(late) else None

        got = wait_until(seq_rows, 90, what="16 rows of user s1", on_fail=worker.log)
        for j, ev in enumerate(late):
            before = sorted((c["ts"], c["event_id"]) for c in late[:j]
                            if c["label"] and c["ts"] < ev["ts"])
            newest = [late[int(e[1:])]["item_id"] for _, e in before[::-1][:3]]
            want = [*hash_tokens("item_id", newest).tolist(), *[0] * (3 - len(newest))]
            assert got[ev["event_id"]] == want, (j, ev, before)
    finally:
        worker.stop()
