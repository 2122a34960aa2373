"""One lifetime for the embedded stack's state: checked by ``up``, ended by ``reset``.

The embedded broker (Tansu) keeps its log in memory only, while Redis (AOF under
``<state_dir>/redis``) and the model store persist across ``headwater down``/``up``
(docs/decisions.md: why not a durable broker). Offsets recorded beside that state name
positions in the broker's log, so state kept from a log that is gone would be applied
to another run's events. ``up`` therefore refuses, naming the fix, when Redis or the
model store records offsets beyond the log's end; ``headwater reset`` (or ``down
--purge``) wipes every piece of kept state so the next ``up`` starts clean.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from core import kafka as kafka_clients
from core.net import redact_url
from core.settings import Settings, is_object_store

#: Hash of each source partition's offset record (features/store.py key layout).
OFFSETS_KEY = "{{hw:p{partition}}}:offsets"


#: Each audit partition's detection state (detection/state_store.py key layout).
AUDIT_STATE_KEYS = "hw:audit:state:*"


def recorded_in_redis(redis_url: str, partitions: int) -> dict[tuple[str, int], int]:
    """``(topic, partition) -> next offset`` every shard of Redis records as applied
    (click counters, and the audit partitions' detection state)."""
    from core.redis_client import connect

    client = connect(redis_url)
    try:
        out = {}
        for p in range(partitions):
            for topic, nxt in client.hgetall(OFFSETS_KEY.format(partition=p)).items():
                out[(topic.decode(), p)] = int(nxt)
        for key in client.scan_iter(AUDIT_STATE_KEYS, count=1000):
            nxt = client.hget(key, "_next")
            topic, _, part = key.decode()[len(AUDIT_STATE_KEYS) - 1:].rpartition(":")
            if nxt is not None and part.isdigit():
                out[(topic, int(part))] = max(out.get((topic, int(part)), 0), int(nxt))
        return out
    finally:
        client.close()


def recorded_in_model_store(settings: Settings) -> tuple[str | None, dict[tuple[str, int], int]]:
    """(newest version, ``(topic, partition) -> offsets it trained past``) of the model store.

    A watermark ``(offset, sub)`` names the next row to train on: ``sub > 0`` means
    rows of ``offset`` itself were trained, so the log must hold ``offset + 1`` offsets.
    """
    from learner.model_stores import open_model_store
    from learner.store import CheckpointError

    if not is_object_store(settings.model_store) and not (
            Path(settings.model_store) / settings.model_name).is_dir():
        return None, {}
    store = open_model_store(settings)
    for version in reversed(store.versions()):
        try:
            manifest = store.manifest(version)
        except CheckpointError:
            continue  # a broken version never serves; the store reports it elsewhere
        out = {}
        for key, mark in (manifest.get("watermarks") or {}).items():
            topic, _, part = key.rpartition(":")
            out[(topic, int(part))] = int(mark["offset"]) + (1 if int(mark.get("sub", 0)) else 0)
        return version, out
    return None, {}


def mismatches(settings: Settings, kafka: str, redis_url: str) -> list[str]:
    """Every recorded position beyond the broker's log end, one line each."""

    from streams.topics import log_ends

    redis_marks = recorded_in_redis(redis_url, settings.partitions)
    version, model_marks = recorded_in_model_store(settings)
    wanted = {tp for tp in (*redis_marks, *model_marks)}
    if not wanted:
        return []
    consumer = kafka_clients.consumer(kafka)
    try:
        existing = consumer.topics()
    finally:
        consumer.close()
    ends: dict[tuple[str, int], int] = {}
    for topic in {t for t, _ in wanted}:
        parts = sorted(p for t, p in wanted if t == topic)
        if topic in existing:
            ends.update({(topic, p): e for p, e in log_ends(kafka, topic, parts).items()})
    lines = []
    for (topic, p), nxt in sorted(redis_marks.items()):
        end = ends.get((topic, p), 0)
        if nxt > end:
            lines.append(f"Redis records {topic}[{p}] applied up to offset {nxt}; "
                         f"the broker's log ends at {end}")
    for (topic, p), nxt in sorted(model_marks.items()):
        end = ends.get((topic, p), 0)
        if nxt > end:
            lines.append(f"model store {settings.model_name}/{version} trained {topic}[{p}] "
                         f"up to offset {nxt}; the broker's log ends at {end}")
    return lines


def refusal(settings: Settings, lines: list[str], embedded_broker: bool) -> str:
    """The message ``up`` refuses with: what does not match, why, and the fix."""
    why = ("The embedded broker keeps its log in memory only, so `headwater down` ended it, "
           "while Redis and the model store kept their state."
           if embedded_broker else "The broker's log was reset or replaced.")
    return ("the broker's log does not match the state kept from an earlier run:\n  "
            + "\n  ".join(lines)
            + f"\n{why} Applying that state to new events would count nothing and serve "
            "another run's features.\nFix: `headwater reset` (or `headwater down --purge`) "
            f"wipes Redis ({settings.state_dir / 'redis'}) and the model store "
            f"({settings.model_store}); then `headwater up`.")


def purge(settings: Settings, echo=print) -> list[Path]:
    """Wipe every piece of kept state: embedded Redis data, model store, positions.

    Logs stay. External servers (``HEADWATER_KAFKA``/``HEADWATER_REDIS``) are not
    touched: the message says so. Call with the stack stopped. Returns what was removed.
    """
    removed = []
    state_dir = settings.state_dir
    targets = [p for p in state_dir.iterdir() if p.name != "logs"] if state_dir.is_dir() else []
    if is_object_store(settings.model_store):
        from learner.model_stores import open_model_store

        store = open_model_store(settings)
        store.clear()
        echo(f"removed every version of {store.location}")
    elif settings.model_store.exists() and not settings.model_store.resolve().is_relative_to(
            state_dir.resolve()):
        targets.append(settings.model_store)
    for path in targets:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
        echo(f"removed {path}")
    for name, value in (("HEADWATER_REDIS", settings.redis), ("HEADWATER_KAFKA", settings.kafka)):
        if value:
            echo(f"note: {name}={redact_url(value) if name == 'HEADWATER_REDIS' else value} "
                 "is an external server: its data was not touched")
    return removed
