"""Per-partition detection state in Redis, so a worker killed with -9 resumes its hosts.

One hash per audit source partition, ``hw:audit:state:<topic>:<partition>``: field
``_next`` is the next source offset to apply, and one field per host, ``h:<host>``,
holds that host's engine state (:meth:`detection.engine.DetectionEngine.dump_state`:
provenance graph, open coalescing window, alert chains) as of ``_next``, and ``_out``
the last batch's outputs (re-sent when its messages are replayed after a crash). A batch's
changed hosts and its new ``_next`` are written by one script, fenced: it writes only if
``_next`` is still the offset the batch started from, so a zombie worker after a
rebalance cannot overwrite the state another worker moved on. The client is injected
(``redis.asyncio``); this module does no other I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KEY_PREFIX = "hw:audit:state:"

#: KEYS[1] state hash; ARGV[1] expected _next ("" = no state yet), ARGV[2] new _next,
#: then (field, value) pairs. Returns {1} when written, {0, recorded _next} when fenced.
_SAVE = """
local cur = redis.call('HGET', KEYS[1], '_next')
if (cur or '') ~= ARGV[1] then
  return {0, cur or ''}
end
local args = {'_next', ARGV[2]}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(args))
return {1, ARGV[2]}
"""


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
    hosts: dict[str, bytes] = field(default_factory=dict)
    last_outputs: bytes | None = None


class DetectionStateStore:
    """Load and save per-partition detection state with an async Redis client."""

    def __init__(self, client) -> None:
        self.client = client
        self._save = client.register_script(_SAVE)

    async def load(self, topic: str, partition: int) -> PartitionState:
        raw = await self.client.hgetall(state_key(topic, partition))
        nxt = raw.pop(b"_next", None)
        hosts = {k[2:].decode(): v for k, v in raw.items() if k.startswith(b"h:")}
        return PartitionState(int(nxt) if nxt is not None else None, hosts, raw.get(b"_out"))

    async def save(self, topic: str, partition: int, expected: int | None, next_offset: int,
                   hosts: dict[str, bytes], outputs: bytes) -> None:
        """Write ``hosts``, ``outputs`` and ``next_offset`` if the state is still at
        ``expected`` (else :class:`StateFenced`)."""
        args: list = ["" if expected is None else str(expected), str(next_offset), "_out", outputs]
        for host, blob in hosts.items():
            args += [f"h:{host}", blob]
        ok, recorded = await self._save(keys=[state_key(topic, partition)], args=args)
        if not int(ok):
            raise StateFenced(topic, partition, expected,
                              recorded.decode() if isinstance(recorded, bytes) else str(recorded))
