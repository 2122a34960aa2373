"""What the product asks of an online store, as a protocol.

The worker's click path applies batches and reads the recorded offsets, its items path
writes attributes and codes, serving reads features, the CLI reads one entity. Two
implementations keep it: :class:`features.store.OnlineStore` (Redis, the product's) and
:class:`features.memory_store.MemoryOnlineStore` (in memory, for unit tests).
``tests/features/test_store_contract.py`` runs one suite against both (Feast style):
counters, point-in-time pre-event features, replays, gaps, rewinds, attributes, codes.
The duplicate-id window beside the counters has its own protocol, :class:`DuplicateWindow`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from features.counters import CounterConfig
from features.store_core import BatchResult

__all__ = ["DuplicateWindow", "OnlineFeatureStore"]


@runtime_checkable
class OnlineFeatureStore(Protocol):
    """The online store's promises (async; the Redis store's sync twin has the same methods).

    - ``apply_batch`` counts each (topic, partition, offset) once: a replayed event gets
      the features of its first application (``replayed``), or ``valid`` False once that
      is no longer known; ``expect_next`` above the recorded next offset raises
      :class:`features.store_apply.GapError` and writes nothing; a replayed offset that
      holds another event id raises :class:`features.store_apply.RewindError`.
    - Pre-event features are point in time: an event's counters hold only contributions
      with an event time strictly before its own (``pit_ties``: or equal), from every
      partition (other partitions' as of the batch's start).
    - Reads sum every partition, decayed to the read time.
    """

    partitions: int
    counters: CounterConfig

    async def apply_batch(self, topic: str, partition: int, events: Any,
                          expect_next: int | None = None) -> BatchResult: ...

    async def next_offsets(self, partition: int) -> dict[str, int]: ...

    async def get_online_features(self, entity_rows: Any, features: list[str] | None = None,
                                  now: float | None = None) -> dict[str, Any]: ...

    async def entity_features(self, entity: str, now: float | None = None) -> dict[str, Any]: ...

    async def put_item_attributes(self, items: Mapping[Any, Mapping[str, Any]],
                                  ts: float | None = None) -> int: ...

    async def get_item_attributes_many(self, item_ids: Sequence[Any]) -> list[dict | None]: ...

    async def get_user_attributes_many(self, user_ids: Sequence[Any]) -> list[dict | None]: ...

    async def set_item_codes(self, item_id: Any, codes: Mapping[str, Sequence[int]],
                             version: str) -> None: ...

    async def get_item_codes_many(self, item_ids: Sequence[Any]) -> list[dict | None]: ...

    async def instance_id(self) -> str:
        """Changes when the store restarted (it may have lost writes since)."""
        ...


@runtime_checkable
class DuplicateWindow(Protocol):
    """The newest event ids per (topic, partition), each with the position it was first
    seen at: :class:`features.event_ids.EventIdWindow` (Redis) and
    :class:`features.memory_store.MemoryIdWindow`
    (``tests/features/test_id_window_contract.py`` holds both to it).

    The same id at the same position is a replay, not a duplicate. The window holds at
    least the ``capacity`` most recently recorded ids; older ones leave it a generation
    (``capacity`` ids, in recording order) at a time.
    """

    async def duplicates(self, topic: str, partition: int, event_ids: Sequence[str],
                         offsets: np.ndarray, subs: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """Record the ids; the mask of those first seen at another position, and where
        (``"offset:sub"``; ``None`` for the others)."""
        ...
