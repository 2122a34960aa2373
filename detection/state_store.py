"""Per-partition detection state in Redis, so a worker killed with -9 resumes its hosts.

One hash per audit source partition, ``hw:audit:state:<topic>:<partition>``: field
``_next`` is the next source offset to apply and ``_out`` the last batch's outputs
(re-sent when its messages are replayed after a crash). A host's engine state as of
``_next`` is its snapshot ``h:<host>`` (:meth:`detection.engine.DetectionEngine.dump_state`:
provenance graph, open coalescing window, alert chains) followed by its journal: one
field ``j:<host>:<offset>`` per batch since the snapshot (the batch's lines, keyed by
the offset the batch started at) and ``a:<host>``, the alert chains after the newest
journal entry (:meth:`detection.engine.DetectionEngine.resume` replays the journal on
the snapshot). A batch writes, per host it touched, either a journal entry or a new
snapshot (deleting that host's journal); its fields, deletions and the new ``_next`` go
in one script, fenced: it writes only if ``_next`` is still the offset the batch
started from, so a zombie worker after a rebalance cannot overwrite the state another
worker moved on. The client is injected (``redis.asyncio``); this module does no other I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KEY_PREFIX = "hw:audit:state:"

#: KEYS[1] state hash; ARGV[1] expected _next ("" = no state yet), ARGV[2] new _next,
#: ARGV[3] the number n of fields to delete, the n fields, then (field, value) pairs.
#: Returns {1} when written, {0, recorded _next} when fenced.
_SAVE = """
local cur = redis.call('HGET', KEYS[1], '_next')
if (cur or '') ~= ARGV[1] then
  return {0, cur or ''}
end
local n = tonumber(ARGV[3])
if n > 0 then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 4, 3 + n))
end
local args = {'_next', ARGV[2]}
for i = 4 + n, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
return {1, ARGV[2]}
"""


def journal_field(host: str, offset: int) -> str:
    """The hash field of a host's journal entry for the batch that started at ``offset``.

    >>> journal_field("db:1", 40)
    'j:db:1:40'
    """
    return f"j:{host}:{offset}"


def state_key(topic: str, partition: int) -> str:
    """Redis key of one audit partition's detection state.

    >>> state_key("audit", 2)
    'hw:audit:state:audit:2'
    """
    return f"{KEY_PREFIX}{topic}:{partition}"


class StateFenced(RuntimeError):
    """Another writer moved the partition's state on: reload it, then retry the batch."""

    def __init__(self, topic: str, partition: int, expected: int | None, recorded: str) -> None:
        super().__init__(f"detection state of {topic}[{partition}] is at offset {recorded or 'none'}, "
                         f"this worker expected {expected}: another worker wrote it")
        self.recorded = recorded


@dataclass
class PartitionState:
    """What :meth:`DetectionStateStore.load` returns: the next offset and host states."""

    next_offset: int | None
    #: host -> snapshot (a host with a journal only has none: it started after it)
    hosts: dict[str, bytes] = field(default_factory=dict)
    last_outputs: bytes | None = None
    #: host -> its journal since the snapshot, oldest first, as (field, entry)
    journals: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)
    #: host -> its alert chains after its newest journal entry
    alerts: dict[str, bytes] = field(default_factory=dict)

    def host_names(self) -> set[str]:
        """Every host with state in the partition (a snapshot, a journal or both)."""
        return set(self.hosts) | set(self.journals)


class DetectionStateStore:
    """Load and save per-partition detection state with an async Redis client."""

    def __init__(self, client) -> None:
        self.client = client
        self._save = client.register_script(_SAVE)

    async def load(self, topic: str, partition: int) -> PartitionState:
        raw = await self.client.hgetall(state_key(topic, partition))
        nxt = raw.pop(b"_next", None)
        state = PartitionState(int(nxt) if nxt is not None else None, last_outputs=raw.get(b"_out"))
        entries: dict[str, list[tuple[int, str, bytes]]] = {}
        for k, v in raw.items():
            name = k.decode()
            if name.startswith("h:"):
                state.hosts[name[2:]] = v
            elif name.startswith("a:"):
                state.alerts[name[2:]] = v
            elif name.startswith("j:"):
                host, offset = name[2:].rsplit(":", 1)
                entries.setdefault(host, []).append((int(offset), name, v))
        for host, found in entries.items():
            state.journals[host] = [(name, v) for _, name, v in sorted(found)]
        return state

    async def save(self, topic: str, partition: int, expected: int | None, next_offset: int,
                   hosts: dict[str, bytes], outputs: bytes, fields: dict[str, bytes] | None = None,
                   delete: list[str] = ()) -> None:
        """Delete the fields ``delete``, then write the snapshots ``hosts``, the other
        ``fields`` (journal entries, alert chains), ``outputs`` and ``next_offset``, if
        the state is still at ``expected`` (else :class:`StateFenced`)."""
        args: list = ["" if expected is None else str(expected), str(next_offset),
                      str(len(delete)), *delete, "_out", outputs]
        for host, blob in hosts.items():
            args += [f"h:{host}", blob]
        for name, blob in (fields or {}).items():
            args += [name, blob]
        ok, recorded = await self._save(keys=[state_key(topic, partition)], args=args)
        if not int(ok):
            raise StateFenced(topic, partition, expected,
                              recorded.decode() if isinstance(recorded, bytes) else str(recorded))
