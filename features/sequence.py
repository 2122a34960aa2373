"""Each user's recent clicks, point in time: the sequence EM3's content-interest model reads.

The online store keeps, per source partition's shard, a sorted set per user
``{hw:p<P>}:~s:<user>`` of that partition's positive events (``label > 0``): member
``<offset>:<sub>:<item id>``, score the event time, the newest ``keep`` by time. A
member names one event of one partition, so writing it twice (a replayed batch, a
zombie writer, a fenced retry) changes nothing: the write needs no fence.

An event's **pre-event sequence** is the items of the user's newest ``length`` clicks
with event time strictly before its own among the clicks applied before it: earlier in
its own partition (offset order: the shard's set and its own batch) and, from other
partitions, those applied when its batch started (as the counters, docs/point-in-time.md).
The event itself, ties and later clicks never count, so a row built at time *t* sees
only clicks before *t* whatever the arrival order, and batch boundaries change nothing.
A replayed event gets its first run's sequence from its own partition (unless ``keep``
newer clicks have pushed older ones out since: then a shorter one, never a later click);
clicks are partitioned by user, so other partitions hold none of its user's. Serving
reads the newest ``length`` clicks before the read time.

>>> own = {"u": [(1.0, "0:0:a"), (5.0, "3:0:c")]}
>>> pre_event_sequences(own, {}, ["u", "u", "v"], [4.0, 6.0, 2.0], [1, 0, 1],
...                     ["7:0:b", "8:0:d", "9:0:e"], 2)
[('a',), ('b', 'c'), ()]
>>> pre_event_sequences({}, {}, ["u", "u"], [9.0, 2.0], [1, 1], ["0:0:a", "1:0:b"], 2)
[(), ()]
>>> newest([(1.0, "0:0:a"), (2.0, "1:0:b"), (3.0, "2:0:c")], now=3.0, length=2)
('a', 'b')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from features.hashing import canonical

__all__ = ["entries_of", "item_of", "member", "newest", "pre_event_sequences", "plan_sequences",
           "plan_user_sequences", "sequence_key", "write_commands"]


def sequence_key(prefix: str, partition: int, user: str) -> str:
    """``{hw:p<P>}:~s:<user>`` (``~`` cannot start a counter name)."""
    return f"{{{prefix}:p{partition}}}:~s:{user}"


def member(offset: int, sub: int, item: str) -> str:
    return f"{int(offset)}:{int(sub)}:{item}"


def item_of(m: str) -> str:
    return m.split(":", 2)[2]


def entries_of(reply: Any) -> list[tuple[float, str]]:
    """``ZRANGE key 0 -1 WITHSCORES`` as ``(ts, member)`` (RESP2 flat or RESP3 pairs)."""
    if not reply:
        return []
    if isinstance(reply[0], list | tuple):
        pairs = [(p[0], p[1]) for p in reply]
    else:
        pairs = list(zip(reply[0::2], reply[1::2], strict=True))
    return [(float(s), m.decode() if isinstance(m, bytes) else str(m)) for m, s in pairs]


def newest(entries: Iterable[tuple[float, str]], now: float, length: int) -> tuple[str, ...]:
    """Items of the newest ``length`` entries strictly before ``now``, oldest first
    (ties in time broken by member, so every store orders them alike)."""
    before = sorted({e for e in entries if e[0] < now})
    return tuple(item_of(m) for _, m in before[-length:]) if length > 0 else ()


def _position(m: str) -> tuple[int, int]:
    offset, sub, _ = m.split(":", 2)
    return int(offset), int(sub)


def pre_event_sequences(own: Mapping[str, Sequence[tuple[float, str]]],
                        other: Mapping[str, Sequence[tuple[float, str]]], users: Sequence[Any],
                        ts: Sequence[float], labels: Sequence[Any], members: Sequence[str],
                        length: int) -> list[tuple[str, ...]]:
    """Per event of one partition's batch (in offset order), its pre-event sequence: the
    user's clicks older than it among those before it in its partition (``own``: that
    shard's entries, the batch's earlier events) and those other partitions had applied
    when the batch started (``other``)."""
    seen: dict[str, list[tuple[float, str]]] = {}
    out = []
    for u, t, lab, m in zip(users, ts, labels, members, strict=True):
        if not u:
            out.append(())
            continue
        u, pos = str(u), _position(m)
        mine = [e for e in own.get(u, ()) if _position(e[1]) < pos]
        out.append(newest([*other.get(u, ()), *mine, *seen.get(u, ())], float(t), length))
        if float(lab) > 0:
            seen.setdefault(u, []).append((float(t), m))
    return out


def write_commands(prefix: str, partition: int, users: Sequence[Any], ts: Sequence[float],
                   labels: Sequence[Any], members: Sequence[str], keep: int) -> list[tuple]:
    """``ZADD`` of the batch's positive events to their users' sets in this partition's
    shard, then trim each to its newest ``keep`` by time."""
    adds: dict[str, list[Any]] = {}
    for u, t, lab, m in zip(users, ts, labels, members, strict=True):
        if u and float(lab) > 0:
            adds.setdefault(str(u), []).extend((repr(float(t)), m))
    cmds: list[tuple] = []
    for u, args in adds.items():
        key = sequence_key(prefix, partition, u)
        cmds.append(("ZADD", key, *args))
        cmds.append(("ZREMRANGEBYRANK", key, 0, -(keep + 1)))
    return cmds


def _ids(values: Any) -> list[str]:
    return [canonical(v) if v is not None and v != "" else "" for v in values]


def plan_sequences(core: Any, partition: int, cols: Mapping[str, Any]) -> Any:
    """One round trip for a batch of one partition (``cols`` in offset order): read every
    shard's sets of the batch's users, then write the batch's clicks to this partition's
    shard (a pipeline runs in order: the reads see the sets before the write). Returns
    the pre-event sequences in ``cols`` order."""
    users, items = _ids(cols["user_id"]), _ids(cols["item_id"])
    members = [member(o, s, i) for o, s, i in
               zip(cols["offset"].tolist(), cols["sub"].tolist(), items, strict=True)]
    distinct = sorted({u for u in users if u})
    reads = [("ZRANGE", sequence_key(core.prefix, q, u), 0, -1, "WITHSCORES")
             for u in distinct for q in range(core.partitions)]
    writes = write_commands(core.prefix, partition, users, cols["ts"].tolist(),
                            cols["label"].tolist(), members, 4 * core.seq_len)
    replies = yield reads + writes
    own: dict[str, list[tuple[float, str]]] = {}
    other: dict[str, list[tuple[float, str]]] = {}
    for k, reply in enumerate(replies[:len(reads)]):
        shard = own if k % core.partitions == partition else other
        shard.setdefault(distinct[k // core.partitions], []).extend(entries_of(reply))
    return pre_event_sequences(own, other, users, cols["ts"].tolist(), cols["label"].tolist(),
                               members, core.seq_len)


def plan_user_sequences(core: Any, users: Sequence[Any], now: float) -> Any:
    """Serving: each user's newest ``seq_len`` clicks before ``now``, from every shard."""
    distinct = sorted({u for u in _ids(users) if u})
    replies = yield [("ZRANGE", sequence_key(core.prefix, q, u), 0, -1, "WITHSCORES")
                     for u in distinct for q in range(core.partitions)]
    stored: dict[str, list[tuple[float, str]]] = {}
    for k, reply in enumerate(replies):
        stored.setdefault(distinct[k // core.partitions], []).extend(entries_of(reply))
    return {u: newest(stored.get(u, ()), now, core.seq_len) for u in distinct}
