"""The duplicate event-id window, kept in Redis so it survives worker restarts.

Per source (topic, partition) Redis holds the position ``offset:sub`` where each recent
event id was first seen, in two generations: ``{hw:p<P>}:ids:<topic>`` (the current one,
where new ids go) and ``{hw:p<P>}:idp:<topic>`` (the previous one). Once the current
generation holds ``capacity`` ids it becomes the previous one and the former previous one
is dropped whole: the window holds at least the ``capacity`` most recently recorded ids
(at most twice as many, plus a batch), with no per-id eviction index to keep. Both keys
sit in the partition's Cluster slot, beside its counters (docs/decisions.md, "Duplicate
event ids").

An id seen again at the *same* position is a replay of the same message (a retry, a
worker restart, a gap re-read): not a duplicate. At another position it is a duplicate
event, refused whichever worker, run or re-read sees it, as long as the first one is
within the window. One script call per batch checks and records every id atomically.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence

import numpy as np

__all__ = ["EventIdWindow"]

_SCRIPT = (importlib.resources.files("features") / "lua" / "event_ids.lua").read_text(encoding="utf-8")


class EventIdWindow:
    """Redis-backed window of recent event ids per (topic, partition).

    ``client`` is a ``redis.asyncio.Redis``; ``capacity`` the ids per generation, the
    fewest recent ids kept per partition (``HEADWATER_DUPLICATE_WINDOW``).
    """

    def __init__(self, client, capacity: int = 200_000, prefix: str = "hw") -> None:
        if capacity < 1:
            raise ValueError(f"the duplicate window must hold at least 1 id, got {capacity}")
        self.client = client
        self.capacity = capacity
        self.prefix = prefix
        self._script = client.register_script(_SCRIPT)

    def keys(self, topic: str, partition: int) -> list[str]:
        """The window's keys for one source partition: the current generation, the
        previous one, and the former layout's eviction index (dropped at a rotation)."""
        slot = f"{{{self.prefix}:p{partition}}}"
        return [f"{slot}:ids:{topic}", f"{slot}:idp:{topic}", f"{slot}:idq:{topic}"]

    async def check(self, topic: str, partition: int, event_ids: Sequence[str],
                    offsets: np.ndarray, subs: np.ndarray) -> list[str | None]:
        """Record the ids; for each, ``None`` or the ``offset:sub`` it was first seen at."""
        return (await self.duplicates(topic, partition, event_ids, offsets, subs))[1]

    async def duplicates(self, topic: str, partition: int, event_ids: Sequence[str],
                         offsets: np.ndarray, subs: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """Mask of events whose id was first seen at another position, and those positions.

        One script call whatever the batch size, its arguments three blobs (ids, their
        lengths, positions) and its reply the duplicates only: per event no Redis argument
        is packed and no reply parsed.
        """
        n = len(event_ids)
        first: list[str | None] = [None] * n
        dup = np.zeros(n, bool)
        if not n:
            return dup, first
        try:
            text = "".join(event_ids)
        except TypeError:  # not all str
            text = None
        if text is not None and text.isascii():  # one encode; byte lengths are str lengths
            blob, sized = text.encode(), event_ids
        else:
            sized = [e.encode() if isinstance(e, str) else str(e).encode() for e in event_ids]
            blob = b"".join(sized)
        lengths = np.fromiter(map(len, sized), np.int32, n).astype("<i4").tobytes()
        pos = np.empty((n, 2), "<f8")
        pos[:, 0], pos[:, 1] = offsets, subs
        res = await self._script(keys=self.keys(topic, partition),
                                 args=[self.capacity, blob, lengths, pos.tobytes()])
        for i, at in zip(res[0::2], res[1::2], strict=True):
            first[int(i) - 1] = at.decode() if isinstance(at, bytes) else str(at)
            dup[int(i) - 1] = True
        return dup, first
