"""headwater.client against the real stack: a real broker, Redis, worker and serving."""

from __future__ import annotations

import time

import pytest

from headwater.client import (
    DeliveryError,
    EventSender,
    FeatureReader,
    HeadwaterError,
    InvalidEvent,
    ServingClient,
)
from headwater.servers import free_port
from tests.stackutil import Service, service_env, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(kafka_bootstrap, redis_url, tmp_path_factory):
    import redis

    tmp = tmp_path_factory.mktemp("client")
    prefix = f"cl{int(time.time() * 1000) % 10**8}-"
    env = service_env(kafka_bootstrap, redis_url, prefix, tmp, HEADWATER_CONTENT_ENCODER="hashing",
                      HEADWATER_ADMIN_TOKEN="t0ken")
    worker = Service("worker", env, tmp / "logs")
    serving = Service("serve", env, tmp / "logs")
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: client.keys(b"hw:status:worker:*") and client.keys(b"hw:status:serving:*"),
                   90, what="worker and serving heartbeats",
                   on_fail=lambda: worker.log() + serving.log())
        yield {"kafka": kafka_bootstrap, "redis": redis_url, "prefix": prefix,
               "http": f"http://127.0.0.1:{env['HEADWATER_HTTP_PORT']}", "worker": worker}
    finally:
        serving.stop()
        worker.stop()
        client.close()


def test_send_read_score_and_alerts(stack, data_dir):
    now = time.time()
    clicks = [{"event_id": f"c{i}", "ts": now - 100 + i, "user_id": f"u{i % 3}", "item_id": f"i{i % 5}",
               "label": int(i % 5 == 0)} for i in range(60)]
    with EventSender(stack["kafka"], topic_prefix=stack["prefix"]) as sender:
        assert sender.send_items([{"item_id": f"i{k}", "ts": now - 200, "text": f"item {k}",
                                   "tags": ["Drama"]} for k in range(5)]) == 5
        assert sender.send_clicks(clicks) == 60
        lines = (data_dir / "audit" / "dev03_ingress_revshell.log").read_text().splitlines()
        assert sender.send_audit(lines, host="client-host") == len(lines)

    with FeatureReader(stack["redis"]) as features:
        doc = wait_until(lambda: (d := features.get("item:i0")) and d.get("impressions_total") == 12 and d,
                         90, what="the worker to count the clicks", on_fail=stack["worker"].log)
        assert doc["clicks_total"] == 12
        with pytest.raises(ValueError, match="entity must be"):
            features.get("i0")

    with ServingClient(stack["http"], admin_token="t0ken") as serving:
        assert serving.ready()
        one = serving.score("u0", ["i0", "i1", 7])
        assert set(one.by_item) == {"i0", "i1", "7"} and one.model_version == "baseline"
        assert one.by_item["i0"] > one.by_item["i1"]  # every click of i0 was a click
        many = serving.score_many([{"user_id": "u0", "candidates": ["i0"]},
                                   {"user_id": "u1", "candidates": ["i2", "i3"]}])
        assert [set(s.by_item) for s in many] == [{"i0"}, {"i2", "i3"}]
        assert serving.unpin()["pinned"] is None
        with pytest.raises(HeadwaterError) as bad:
            serving.score("u0", ["i0", {"not": "an id"}])
        assert bad.value.status == 400 and bad.value.field == "candidates[1]"
        alerts = wait_until(lambda: serving.alerts(host="client-host", min_severity="high"), 120,
                            what="an alert from the attack log", on_fail=stack["worker"].log)
        assert alerts[0]["host"] == "client-host" and alerts[0]["techniques"]


def test_a_bad_event_fails_in_the_producers_hands(stack):
    with EventSender(stack["kafka"], topic_prefix=stack["prefix"]) as sender:
        with pytest.raises(InvalidEvent, match=r"clicks\[1\].label must be 0 or 1"):
            sender.send_clicks([{"event_id": "a", "ts": time.time(), "user_id": 1, "item_id": 2, "label": 1},
                                {"event_id": "b", "ts": time.time(), "user_id": 1, "item_id": 2, "label": 7}])
        with pytest.raises(InvalidEvent, match=r"items\[0\].*item_id"):
            sender.send_items([{"ts": time.time()}])
        assert sender.sent == 0  # nothing of a refused batch went out


def test_delivery_errors_are_raised_on_flush(stack):
    sender = EventSender(stack["kafka"], topic_prefix=stack["prefix"], max_request_size=2048)
    try:
        sender.send_audit(["type=SYSCALL msg=audit(1.0:1): " + "x" * 4096], host="big")
        with pytest.raises(DeliveryError, match="1 of 1 messages not delivered"):
            sender.flush()
    finally:
        sender.close()


def test_serving_unreachable_is_a_clear_error():
    with ServingClient(f"http://127.0.0.1:{free_port()}") as serving:
        with pytest.raises(HeadwaterError, match="unreachable"):
            serving.models()
        assert serving.ready() is False
