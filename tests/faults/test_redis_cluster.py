"""The stack on a real Redis Cluster (three masters, three replicas), through a failover.

The worker, the learner and serving run with ``HEADWATER_REDIS=redis+cluster://…``
(redis-py's cluster client). Counters must be exact after the first half of the events,
and again after the master holding a click partition's slot is killed with -9 and its
replica promoted (replication is asynchronous: whatever the replica missed is re-read
from Kafka by the worker, which sees the failover as a new set of primaries).
"""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest
from redis.exceptions import RedisClusterException

from core.redis_client import connect
from features.store_core import APPLY
from headwater.servers import start_redis_cluster
from tests.faults.test_worker_faults import (
    N_EVENTS,
    PARTITIONS,
    _assert_exact,
    expected_totals,
    produce,
    wait_all_counted,
)
from tests.stackutil import Service, service_env, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def _owner(cluster, key: str):
    """The node (of ``cluster.nodes``) that is master of ``key``'s slot now."""
    client = connect(cluster.url)
    try:
        node = client.get_node_from_key(key)
        return next(n for n in cluster.nodes if n.port == node.port)
    finally:
        client.close()


def _replica_of(cluster, master):
    """The node replicating ``master``."""
    client = connect(cluster.url)
    try:
        info = client.info("replication", target_nodes=client.get_node(master.host, master.port))
        port = int(info["slave0"]["port"])
        return next(n for n in cluster.nodes if n.port == port)
    finally:
        client.close()


def _drop_replicas(master) -> None:
    """The master closes its replicas' links (what it writes next reaches no replica)."""
    import redis

    client = redis.Redis(host=master.host, port=master.port)
    try:
        client.execute_command("CLIENT", "KILL", "TYPE", "replica")
    finally:
        client.close()


def _codebooks_on_the_cluster(url: str) -> None:
    """The codebook publication (lease, current, version in one script) and the guarded
    code write (keys of many slots) on the cluster, through the worker's own store."""
    import asyncio

    import numpy as np

    from core.redis_client import connect_async
    from features.codebook_store import CodebookStore

    async def go():
        client = connect_async(url)
        try:
            store = CodebookStore(client, "test-L1-K2-vq1", 30, lambda i: f"hw:codes:item:{i}")
            token = await store.acquire()
            assert token and await store.publish(token, "000001-abc", {"rq0": np.eye(2)})
            assert (await store.current())[0] == "000001-abc"
            codes = {str(i): {"rq": [i % 2], "vq": [i]} for i in range(40)}
            assert await store.write_codes(codes, "000001-abc", chunk=7) == 40
            raw = await client.hget("hw:codes:item:39", "codes")
            assert json.loads(raw) == {"rq": [1], "vq": [39]}
            assert await store.write_codes(codes, "000000-old") == 0  # older generation
        finally:
            await client.aclose()

    asyncio.run(go())


def _status(url: str) -> dict[str, dict]:
    from core.health import read_all_sync

    client = connect(url)
    try:
        return {d["service"]: d for d in read_all_sync(client)}
    finally:
        client.close()


def test_stack_on_redis_cluster_exact_through_a_master_failover(kafka_bootstrap, tmp_path,
                                                                topic_prefix, events):
    from core.settings import Settings
    from streams.topics import ensure_topics

    cluster = start_redis_cluster(data_dir=tmp_path / "cluster", log_dir=tmp_path / "logs")
    services: list[Service] = []
    try:
        env = service_env(kafka_bootstrap, cluster.url, topic_prefix, tmp_path,
                          HEADWATER_CONTENT_ENCODER="hashing", HEADWATER_CLICK_BATCH_SIZE=500,
                          HEADWATER_PUBLISH_EVERY_SECONDS=1, HEADWATER_EMBEDDING_BUCKETS=256,
                          HEADWATER_EMBEDDING_DIM=4)
        ensure_topics(Settings(topic_prefix=topic_prefix, partitions=PARTITIONS), kafka_bootstrap)
        services += [Service(name, env, tmp_path / "logs") for name in ("worker", "learner", "serve")]
        stack = {"url": cluster.url, "kafka": kafka_bootstrap, "prefix": topic_prefix,
                 "logs": lambda: "\n".join(s.log()[-3000:] for s in services)}
        clicks = f"{topic_prefix}clicks"
        half, three_quarters = events[: N_EVENTS // 2], events[: 3 * N_EVENTS // 4]
        produce(kafka_bootstrap, clicks, half)
        wait_all_counted(cluster.url, expected_totals(half), 120, stack["logs"])

        # The replica of the master holding partition 0's slot is frozen (SIGSTOP) and
        # its replication link dropped by the master, so a quarter of the events is
        # counted on the master alone; then the master is killed with -9 and the replica,
        # resumed, promoted: those writes are gone from the cluster, as any write not yet
        # replicated is when a master dies.
        victim = _owner(cluster, "{hw:p0}:offsets")
        replica = _replica_of(cluster, victim)
        replica.proc.send_signal(signal.SIGSTOP)
        try:
            _drop_replicas(victim)
            produce(kafka_bootstrap, clicks, events[N_EVENTS // 2: 3 * N_EVENTS // 4])
            wait_all_counted(cluster.url, expected_totals(three_quarters), 120, stack["logs"])
            victim.proc.kill()
            victim.proc.wait()
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        # From here on the test's own clients seed from live nodes only (the dead one's
        # port may belong to another process by now); the services keep the full URL.
        cluster.url = "redis+cluster://" + ",".join(
            f"{n.host}:{n.port}" for n in cluster.nodes if n is not victim)
        stack["url"] = cluster.url
        wait_until(lambda: _owner(cluster, "{hw:p0}:offsets") is replica, 60, interval=0.5,
                   what="the replica promoted", on_fail=stack["logs"])
        produce(kafka_bootstrap, clicks, events[3 * N_EVENTS // 4:], pause=0.002)
        _assert_exact(stack, events)
        worker = services[0]
        assert worker.alive() and "Redis restarted or came back" in worker.log()
        assert "re-reading the gap" in worker.log()  # what the promoted replica missed

        # The learner trained from the worker's rows and reports through the cluster;
        # serving scores with the cluster's counters after the failover.
        wait_until(lambda: _status(cluster.url).get("learner", {}).get("rows_trained", 0) > 0, 90,
                   interval=0.5, what="the learner training", on_fail=stack["logs"])
        body = json.dumps({"user_id": str(events[0]["user_id"]),
                           "candidates": [str(e["item_id"]) for e in events[:5]]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{env['HEADWATER_HTTP_PORT']}/v1/score",
                                         data=body, headers={"Content-Type": "application/json"})

        def scored():
            try:
                return json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                return None

        answer = wait_until(scored, 60, interval=0.5, what="serving to answer",
                            on_fail=stack["logs"])
        assert len(answer["scores"]) == 5
        assert all(s.alive() for s in services)
        assert "serving" in _status(cluster.url)
        _codebooks_on_the_cluster(cluster.url)
        # A script whose keys span two partitions' slots is refused before it runs.
        client = connect(cluster.url)
        try:
            with pytest.raises(RedisClusterException, match="same key slot"):
                client.evalsha(APPLY[1], 2, "{hw:p0}:offsets", "{hw:p1}:offsets")
        finally:
            client.close()
    finally:
        for svc in services:
            svc.stop()
        cluster.stop()


@pytest.fixture(scope="module")
def events(data_dir):
    from features.movielens import click_events, load_movielens

    return click_events(load_movielens(data_dir / "ml-100k"), 0, N_EVENTS)
