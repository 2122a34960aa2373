"""What the fault tests do to the real stack (``tests/faults/conftest.py``'s ``stack``):
restart Redis (optionally from an older copy of its data), send items, read heartbeats
and stored item codes."""

from __future__ import annotations

import json

from kafka import KafkaProducer

from features.movielens import load_movielens
from headwater.servers import start_redis
from streams.topics import partition_of
from tests.faults.conftest import PARTITIONS


def restart_redis(stack, log_name: str, restore_from=None) -> None:
    """Kill Redis and start it again on the same port, optionally from an older copy."""
    import shutil

    old = stack["redis"]
    port, data = old.port, stack["tmp"] / "redis"
    old.proc.kill()
    old.proc.wait()
    if restore_from is not None:
        shutil.rmtree(data)
        shutil.copytree(restore_from, data)
    stack["redis"] = start_redis(port=port, data_dir=data, log_path=stack["tmp"] / log_name)


def snapshot_redis(stack) -> object:
    """Restart Redis, keeping a copy of its data as it was (an older AOF to restore)."""
    import shutil

    old = stack["redis"]
    old.proc.kill()
    old.proc.wait()
    snapshot = stack["tmp"] / "redis-snapshot"
    shutil.copytree(stack["tmp"] / "redis", snapshot)
    stack["redis"] = start_redis(port=old.port, data_dir=stack["tmp"] / "redis",
                                 log_path=stack["tmp"] / "redis2.log")
    return snapshot


def movielens_items(data_dir) -> list[dict]:
    """MovieLens-100K's items as ``items`` events (title, genres, year)."""
    ml = load_movielens(data_dir / "ml-100k")
    return [{"item_id": str(iid), "ts": 880_000_000.0, "text": doc.get("title") or "",
             "tags": list(doc.get("genres") or []),
             "attributes": {"year": doc.get("year")} if doc.get("year") else {}}
            for iid, doc in ml.items.items()]


def send_envelopes(kafka: str, topic: str, docs: list[dict], key: str, size: int,
                   partitions: int = PARTITIONS) -> None:
    """``docs`` in JSON envelopes of ``size``, each to the partition of its ``key`` field
    (as a producer keying by it would), in order within a partition."""
    producer = KafkaProducer(bootstrap_servers=kafka)
    parts = partition_of([d[key] for d in docs], partitions)
    for p in range(partitions):
        mine = [d for d, dp in zip(docs, parts, strict=True) if dp == p]
        for i in range(0, len(mine), size):
            producer.send(topic, json.dumps(mine[i:i + size]).encode(), partition=p)
    producer.flush()
    producer.close()


def send_items(kafka: str, topic: str, items: list[dict], partitions: int = PARTITIONS) -> None:
    """Items in envelopes of 50, each to its item's partition."""
    send_envelopes(kafka, topic, items, "item_id", 50, partitions)


def worker_statuses(client) -> list[dict]:
    """Every live worker's heartbeat document."""
    return [json.loads(raw) for key in client.scan_iter("hw:status:worker:*")
            if (raw := client.get(key)) is not None]


def stored_codes(client, ids) -> dict[str, tuple]:
    """Item id -> (RQ codes, VQ code, codebook version) for the ids that have codes."""
    out = {}
    for i in ids:
        doc = client.hgetall(f"hw:codes:item:{i}")
        if doc:
            c = json.loads(doc[b"codes"])
            out[i] = (c["rq"], c["vq"], json.loads(doc[b"version"]))
    return out
