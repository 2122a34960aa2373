"""Service heartbeats on a real Redis: readers find them through the index, not a SCAN."""

from __future__ import annotations

import time

import redis

from core import health


def test_readers_use_the_index_and_forget_dead_and_stale_entries(redis_db, monkeypatch):
    client = redis.Redis.from_url(redis_db)
    try:
        for k in range(500):  # counter keys a SCAN would walk through
            client.set(f"hw:c:item:{k}", 1)
        live = health.make_status("worker", time.time() - 5, events_in_total=3)
        health.publish_sync(client, live)
        dead = health.make_status("learner", time.time() - 50)
        dead["instance"] = "gone-1"
        health.publish_sync(client, dead)
        client.delete(health.status_key("learner", "gone-1"))  # its TTL ran out
        assert [d["service"] for d in health.read_all_sync(client)] == ["worker"]
        assert client.zcard(health.INDEX) == 2  # a dead entry stays until it is stale

        calls = []
        monkeypatch.setattr(client, "scan_iter", lambda *a, **k: calls.append(a) or iter(()))
        later = time.time() + health.INDEX_KEEP_S + 1
        monkeypatch.setattr(health.time, "time", lambda: later)
        health.read_all_sync(client)  # the live one is stale too, by the reader's clock
        assert client.zcard(health.INDEX) == 0 and calls == []
    finally:
        client.close()
